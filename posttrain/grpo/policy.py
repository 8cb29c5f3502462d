"""The policy's side of GRPO: loading the model to train and its frozen KL reference, and scoring a padding-free
packed row through the fused chunked kernel, so a full logits tensor never exists. This module never changes
weights and never computes a loss.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch

from posttrain.families import core_model, is_in_tree


def load_policy(folder: str, dtype: str, field: str, module_class: str | None):
    """The model in ``folder``: the in-tree class for the in-tree families, unless ``module_class`` (what the engine
    decodes, see ``EngineSpec.module_class``) is ``transformers``; transformers' own class for any other family."""
    from posttrain.families import check_trainable, load_causal_lm, read_model_type
    from posttrain.models.hybrid import IN_TREE_MODEL_TYPES, HybridForCausalLM

    if read_model_type(folder, field)[0] in IN_TREE_MODEL_TYPES and module_class != "transformers":
        return HybridForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    check_trainable(folder, field)
    return load_causal_lm(folder, field, dtype=getattr(torch, dtype))


def reference_model(config, model):
    """The frozen KL reference of a run with ``loss.beta`` > 0 (see ``ModelConfig.ref_path``), in the policy's class
    and weights dtype; None without a KL term, or for a LoRA model (its reference is itself with its adapters
    disabled)."""
    c, ref = config, None
    if c.loss.beta > 0:
        if c.model.ref_path:
            if not (Path(c.model.ref_path) / "config.json").is_file():
                raise ValueError(f"model.ref_path: no checkpoint (config.json) in {c.model.ref_path}")
            ref = load_policy(c.model.ref_path, str(core_model(model).dtype).removeprefix("torch."), "model.ref_path",
                              "in-tree" if is_in_tree(model) else "transformers")
        elif not hasattr(model, "disable_adapter"):  # with LoRA the reference is the policy, adapters off
            ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False) if ref is not None else None


def final_hidden(model, ids: torch.Tensor, positions: torch.Tensor, router_aux: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last layer's normed hidden states (1, L, H) of a packed row (``positions`` restart at 0 at each sequence),
    through ``model`` itself (a DDP wrapper syncs its gradients): the in-tree model without logits; a transformers
    model without a cache, its packed-sequence masks read off the positions, and the logits of one position only.
    With ``router_aux``, also the mixture of experts' load-balancing loss as the model computes it (else None)."""
    if is_in_tree(model):
        out = model(ids, position_ids=positions, return_logits=False, output_router_logits=router_aux)
        return out.hidden_states, out.aux_loss if router_aux else None
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(core_model(model).forward).parameters else {}
    if router_aux:
        extra["output_router_logits"] = True
    out = model(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True, **extra)
    return out.hidden_states[-1], getattr(out, "aux_loss", None) if router_aux else None


def head_logprobs(core, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """Log-probs (and entropies) of ``targets`` under ``core``'s output layer at ``temperature``, by the fused chunked
    kernel (no full logits tensor); a transformers model's head is its output embeddings, Granite's logits divided by
    its ``logits_scaling``."""
    if is_in_tree(core):
        return core.token_logprobs(hidden, targets, temperature=temperature, return_entropy=entropy)
    from posttrain.kernels import fused_linear_logprobs

    head, config = core.get_output_embeddings(), core.config
    if getattr(head, "bias", None) is not None or getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"model.path: GRPO computes log-probabilities with the fused kernel, which has no output "
                         f"bias or logit soft-capping; the {config.model_type} model has one")
    return fused_linear_logprobs(hidden, head.weight, targets, temperature=temperature,
                                 logits_scaling=getattr(config, "logits_scaling", 1.0), return_entropy=entropy)
