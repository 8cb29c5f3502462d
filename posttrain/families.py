"""Model families: which checkpoints the stages can train, loading a transformers one strictly, the LoRA targets a
family gets by default, and whether a transformers model keeps the sequences of a packed row apart.

The family is read from the checkpoint's ``config.json`` (``model_type``), never chosen by the user. The in-tree
models (``posttrain.models``) pack natively; any other causal LM runs as transformers' own class, and packs through
transformers' packed-sequence masks: with ``attention_mask=None`` and no cache, ``masking_utils`` reads the
sequence boundaries off ``position_ids`` that restart at 0 (with ``sdpa`` and ``eager`` attention; no flash-attn
needed); whether a family does so is probed (``check_packed_rows``). This module never trains and never writes files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from posttrain.train.chassis import TrainingError

# the in-tree hybrid's default LoRA targets: the Mamba-2 in/out projections and the attention projections
HYBRID_LORA_TARGETS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj")


class ModelFamilyError(TrainingError):
    """A checkpoint no stage can train, or a setting its family cannot honour; the message names file and field."""


def read_model_type(folder: str | os.PathLike, field: str = "model.path") -> tuple[str, dict]:
    """(``model_type``, the whole config) of the checkpoint in ``folder``; errors name the file and field."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{field} {folder}: no config.json there")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFamilyError(f"{path}: not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelFamilyError(f"{path}: no `model_type` field, so the model family is unknown")
    return model_type, config


def check_trainable(folder: str | os.PathLike, field: str = "model.path") -> str:
    """The ``model_type`` of ``folder`` if it is a decoder-only causal LM the stages can train; otherwise a
    ``ModelFamilyError`` naming the file and its ``model_type`` (an encoder, an encoder-decoder, a vision model)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type, config = read_model_type(folder, field)
    path = Path(folder) / "config.json"
    if config.get("is_encoder_decoder"):
        raise ModelFamilyError(f"{field}: {path} has model_type {model_type!r}, an encoder-decoder model; posttrain "
                               "trains decoder-only causal language models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelFamilyError(f"{field}: {path} has model_type {model_type!r}, an encoder (bidirectional "
                               "attention, trained as a masked language model); posttrain trains decoder-only causal "
                               "language models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        raise ModelFamilyError(f"{field}: {path} has model_type {model_type!r}, whose code ships with the checkpoint "
                               "(auto_map, trust_remote_code); posttrain runs only the model classes transformers "
                               "itself has")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelFamilyError(f"{field}: {path} has model_type {model_type!r}, which is not a causal language model "
                               "(transformers' AutoModelForCausalLM has no class for it); posttrain trains decoder-only "
                               "causal language models")
    return model_type


def load_causal_lm(folder: str | os.PathLike, field: str = "model.path", **kwargs):
    """transformers' ``AutoModelForCausalLM`` for ``folder``, loaded strictly: weight files that lack a tensor its
    config.json implies, hold one it does not, or hold one of another shape are a ``ModelFamilyError`` naming the
    folder, the field and the first such tensors (transformers would otherwise initialise them at random)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        # load again only to learn which tensors differ, and refuse
        _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
        model = None
    for kind in ("mismatched_keys", "missing_keys", "unexpected_keys"):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if names:
            raise ModelFamilyError(f"{field}: the weight files in {folder} do not match its config.json ("
                                   f"{kind.replace('_', ' ')}: {', '.join(names[:4])}"
                                   f"{', ...' if len(names) > 4 else ''})")
    return model


def core_model(model):
    """The model inside DDP/FSDP and peft wrappers."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def is_in_tree(model) -> bool:
    """Whether ``model`` (possibly wrapped) is one of posttrain's own models rather than a transformers class."""
    return type(core_model(model)).__module__.startswith("posttrain.")


def router_loss_on(model, moe_aux_loss: bool) -> bool:
    """Whether ``model.moe_aux_loss`` adds a router load-balancing loss for ``model`` (in any command): asked for, and
    the model has a mixture of experts with such a loss: experts (transformers names their count ``num_local_experts``
    in Granite, Mixtral and the in-tree models, ``num_experts`` in Qwen2-MoE, Qwen3-MoE and OLMoE) and a
    ``router_aux_loss_coef`` (DeepSeek-V3's bias balancing has none)."""
    config = core_model(model).config
    experts = getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0)
    return bool(moe_aux_loss and experts and hasattr(config, "router_aux_loss_coef"))


def effective_weight(module) -> torch.Tensor:
    """The weight ``module``'s forward applies: a plain layer's own; a peft LoRA layer's base weight plus the delta
    of each active adapter (B A times its scaling), unless the adapters are merged in already or disabled. The
    native decode plan and the engines' weight syncs read adapted models through this, never merging in place."""
    if not hasattr(module, "lora_A") or module.merged or module.disable_adapters:  # plain, or LoRA switched off
        return module.weight
    weight = module.base_layer.weight
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """``model``'s state dict under its checkpoint's names: in a model with peft LoRA layers (a peft wrapper, or the
    base model inside it) each adapted weight is its ``effective_weight`` under the base layer's own name, and the
    adapters' own tensors are left out; any other model's state dict as it is."""
    core, out = core_model(model), {}
    for key, tensor in core.state_dict().items():
        owner, sep, rest = key.partition(".base_layer.")
        if ".lora_" in key:  # an adapter's own tensors (lora_A, lora_B)
            continue
        if sep:
            key = f"{owner}.{rest}"
            tensor = effective_weight(core.get_submodule(owner)).detach() if rest == "weight" else tensor
        out[key] = tensor
    return out


def default_lora_targets(model) -> list[str]:
    """The module names LoRA adapts when ``lora.target_modules`` is not given.

    The in-tree hybrid: its Mamba-2 in/out and attention projections (those it has). Any other model: every linear
    layer of its decoder blocks (e.g. ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` for Llama and
    Qwen2, ``qkv_proj o_proj gate_up_proj down_proj`` for Phi-3), read from the model itself; not the output head,
    and not a mixture of experts' router or a scalar gate (one output per expert, or a single output)."""
    core = core_model(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in core.named_modules()}
    if is_in_tree(core) and getattr(core.config, "model_type", None) == "granitemoehybrid":
        return [t for t in HYBRID_LORA_TARGETS if t in names]
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    cfg = core.config
    experts = {getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")} - {None}
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer, which peft adapts too

    found: list[str] = []
    for name, module in core.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or module is head:
            continue
        outputs = module.out_features if isinstance(module, torch.nn.Linear) else module.nf
        if outputs == 1 or outputs in experts:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in found:
            found.append(leaf)
    if not found:
        raise ModelFamilyError(f"lora.target_modules: the {cfg.model_type} model has no linear layer to adapt by "
                               "default; name the modules to adapt")
    return found


def check_packed_rows(model, field: str = "data.packing", atol: float = 1e-3) -> None:
    """A ``ModelFamilyError`` naming ``field`` unless ``model`` gives a packed row (two sequences, ``position_ids``
    restarting at 0, ``attention_mask=None``) the logits it gives each sequence alone. The in-tree models pack
    natively and are not probed. The probe is two short random sequences in float32 under no_grad."""
    core = core_model(model)
    if is_in_tree(core):
        return
    cfg = core.config
    impl = getattr(cfg, "_attn_implementation", None) or "default"
    where = f"{field}: the {cfg.model_type} model (attn_implementation {impl!r})"
    g = torch.Generator().manual_seed(0)
    lengths = (5, 7)
    device = next(core.parameters()).device
    seqs = [torch.randint(0, cfg.vocab_size, (1, n), generator=g).to(device) for n in lengths]
    ids = torch.cat(seqs, 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    training = core.training
    core.eval()
    try:
        with torch.no_grad():
            packed = core(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
            alone = torch.cat([core(input_ids=s, use_cache=False).logits.float() for s in seqs], 1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelFamilyError(f"{where} cannot run a packed row ({type(e).__name__}: {e}); set {field}: false"
                               ) from None
    finally:
        core.train(training)
    diff = float((packed - alone).abs().max())
    if not diff <= atol * max(1.0, float(alone.abs().max())):
        raise ModelFamilyError(f"{where} does not keep the sequences of a packed row apart (position_ids restarting "
                               f"at 0 change the logits by {diff:.3g}: its attention or state crosses the boundary); "
                               f"set {field}: false")
