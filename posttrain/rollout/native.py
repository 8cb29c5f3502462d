"""The native generation engine: batched sampling from the in-tree models (the hybrid and dense Granite), for
rollouts and serving.

Prompts of any lengths are prefilled together as one packed row (each prompt once, however many samples it
gets), their states copied G ways, then decoded by the shared loop (``ModuleEngine._decode``) one token per step with
a preallocated state: a fixed-size conv window and SSM state per Mamba layer, a KV cache for the attention layers
only (:mod:`posttrain.rollout.native_decode`). This module never trains, and changes a model's weights only in
``sync_weights``, when asked to.
"""
from __future__ import annotations

import torch

from posttrain.models.hybrid.modeling import HybridCache, HybridForCausalLM
from posttrain.rollout.base import (
    Completion,
    ModuleEngine,
    SamplingParams,
    sample,  # noqa: F401  (re-exported: callers import the sampler beside the engine)
)
from posttrain.rollout.native_decode import DecodePlan, prefill


class NativeEngine(ModuleEngine):
    """Batched sampling from an in-tree model (see the module docstring)."""

    name = "native"
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
        model = self.model
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        cache = HybridCache.allocate(model.config, len(prompts), max_len, device=model.device, dtype=model.dtype)
        logits = prefill(model, prompts, cache)  # each prompt once
        self.stats.prefill_tokens += sum(len(p) for p in prompts)

        def select(rows: torch.Tensor) -> None:
            nonlocal cache
            cache = cache.index_select(rows)

        return self._decode(prompts, offset, params, generator, on_step, logits, select,
                            lambda tokens, _step: plan.step(tokens, cache), lambda: cache.nbytes())
