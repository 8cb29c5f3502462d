"""The native generation engine: batched sampling from the in-tree models (the hybrid and dense Granite), for
rollouts and serving.

Prompts of any lengths are prefilled together as one packed row (each prompt once, however many samples it
gets), their states copied G ways, then decoded one token per step with a preallocated state: a fixed-size conv
window and SSM state per Mamba layer, a KV cache for the attention layers only. Finished rows leave the batch, so
they stop costing compute. Completions are as :mod:`posttrain.rollout.base` defines them, log-probabilities included.
Capabilities: streaming (``on_step``), weight sync (``sync_weights``: a no-op when the trainer hands over the
module this engine decodes, which it does with the policy itself, else a copy of the trainer's tensors), and
``shares_module``: it decodes with the module it was given, so in float32 its log-probabilities are the trainer's.
This module never trains, and changes a model's weights only in ``sync_weights``, when asked to.
"""

from __future__ import annotations

import torch

from posttrain.models.hybrid.modeling import HybridCache, HybridForCausalLM
from posttrain.rollout.base import (
    Capabilities,
    Completion,
    DecodeRows,
    ModuleEngine,
    SamplingParams,
    sample,  # noqa: F401  (re-exported: callers import the sampler beside the engine)
)
from posttrain.rollout.native_decode import DecodePlan, prefill


class NativeEngine(ModuleEngine):
    """Batched sampling from an in-tree model (see the module docstring)."""

    name = "native"
    capabilities = Capabilities(weight_sync=True, streaming=True, shares_module=True, prompt_logprobs=True)

    model: HybridForCausalLM

    @classmethod
    def from_pretrained(cls, folder, device: str | None = None, dtype: torch.dtype | None = None,
                        max_num_seqs: int = 256) -> NativeEngine:
        """The engine on the in-tree checkpoint in ``folder`` (hybrid or dense Granite), in eval mode."""
        model = HybridForCausalLM.from_pretrained(folder, device=device, dtype=dtype).eval()
        return cls(model, max_num_seqs=max_num_seqs)

    def _prepare(self) -> DecodePlan:
        return DecodePlan(self.model)  # from the weights as they are now: they change between calls in RL

    def _generate_wave(self, prompts, offset, params: SamplingParams, generator, plan, on_step) -> list[Completion]:
        model, device = self.model, self.model.device
        n_prompts, n = len(prompts), params.n
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        cache = HybridCache.allocate(model.config, n_prompts, max_len, device=device, dtype=model.dtype)
        logits = prefill(model, prompts, cache)  # each prompt once
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        if n > 1:  # copy each prompt's state G ways
            rows = torch.arange(n_prompts, device=device).repeat_interleave(n)
            cache, logits = cache.index_select(rows), logits.index_select(0, rows)
        self.stats.cache_bytes = max(self.stats.cache_bytes, cache.nbytes())
        book = DecodeRows(prompts, offset, params, device, on_step)
        for step in range(params.max_new_tokens):
            next_tokens, keep = book.decode(step, logits, generator)
            if book.done:
                break
            if keep is not None:  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache, next_tokens = cache.index_select(index), next_tokens[index]
            logits = plan.step(next_tokens, cache)
            self.stats.steps += 1
            self.stats.rows_forwarded += len(book.active)
        return book.completions()
