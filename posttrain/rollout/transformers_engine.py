"""The transformers generation engine: batched sampling from any causal LM that transformers loads (Llama, Qwen,
Mistral, Granite, ...), for rollouts and serving where the native engine does not apply.

It runs the shared decode loop (``ModuleEngine._decode``) over the very module it is given (given the trainer's
policy it sees every optimizer step with no copy; ``Capabilities.shares_module``), not ``model.generate``: prompts
of any lengths are left-padded into one batch, with an attention mask and position ids that start at 0 at each
prompt's first real token, so every row computes what that prompt alone would. Each prompt is prefilled once,
however many samples it gets, into transformers' own ``StaticCache`` (sized to the longest prompt plus
``max_new_tokens``), then the cache is copied G ways and decoded one token per step, every row writing the same
slot; finished rows leave the batch.

Where the model's layers are all full attention with the ``sdpa`` or ``eager`` implementation, attention sees only
the slots written so far (:class:`WrittenSlotsLayer`), and the engine keeps the decode step's 4D mask itself,
updated in place one slot per step (or left out where no prompt is padded); any other layout passes the 2D mask and
lets the model build its own, as ``generate`` does; a model without attention gets no mask in a decode step.
Mamba layers run through transformers' own code, which zeroes the padded positions' inputs so a left-padded row's
state equals its prompt's alone; on CPU that is its slow torch path (the ``native`` engine runs the in-tree Granite
models faster).

Limits: a model whose cache layers are not in ``SUPPORTED_LAYERS`` is refused with :class:`EngineError` at
construction, naming the engines to use instead. Written against transformers' 5.x cache API (static layers that
track their own length); the cache goes to the model under the keyword its forward takes (``cache`` from 5.24,
``past_key_values`` or Mamba's ``cache_params`` before); the tests pass on 5.17 and 5.24.
This module never trains, and changes a model's weights only in ``sync_weights``/``load_named_tensors``, when asked.
"""
from __future__ import annotations

import inspect

import torch
from transformers import StaticCache, cache_utils
from transformers.cache_utils import StaticLayer

from posttrain.rollout.base import Completion, EngineError, ModuleEngine, SamplingParams

# the cache layers this engine has been checked with (tests/test_transformers_engine.py): full attention (Llama,
# Qwen2, Granite), sliding windows (Mistral), Mamba state (Mamba, the Granite 4.0-H hybrid), Mamba beside attention
# in one layer (Falcon-H1), and layers without a cache (``DummyLayer``, which older transformers do not have)
SUPPORTED_LAYERS = tuple(getattr(cache_utils, name) for name in (
    "StaticLayer", "StaticSlidingWindowLayer", "LinearAttentionLayer", "LinearAttentionAndStaticFullAttentionLayer",
    "DummyLayer") if hasattr(cache_utils, name))


class TransformersEngine(ModuleEngine):
    name = "transformers"

    def __init__(self, model, max_num_seqs: int = 256):
        config = model.config
        if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
            raise EngineError(f"the transformers engine runs causal LMs; {type(model).__name__} is not one")
        try:
            layers = StaticCache(config=config, max_cache_len=1).layers
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise EngineError(f"the transformers engine cannot preallocate a cache for {type(model).__name__} "
                              f"({type(err).__name__}: {err}); use the 'native' engine for the in-tree Granite "
                              "models (hybrid and dense), or 'vllm'") from err
        # exact classes: a subclass (an indexed or compressed layer) keeps more than keys and values
        unsupported = sorted({type(layer).__name__ for layer in layers if type(layer) not in SUPPORTED_LAYERS})
        if unsupported:
            raise EngineError(f"the transformers engine has not been checked with {type(model).__name__}'s cache "
                              f"layers ({', '.join(unsupported)}); use the 'native' engine for the in-tree Granite "
                              "models (hybrid and dense), or 'vllm'")
        forward = inspect.signature(model.forward).parameters
        # the cache's keyword: ``cache`` from transformers 5.24; before, ``past_key_values`` (``cache_params`` on Mamba)
        names = [name for name in ("cache", "past_key_values", "cache_params") if name in forward]
        if not names:
            raise EngineError(f"{type(model).__name__}.forward takes no cache argument; the transformers engine "
                              "cannot decode it step by step")
        self._cache_kwarg = names[0]
        self._pass_cache_position = "cache_position" in forward
        self._logits_to_keep = "logits_to_keep" in forward
        # the engine keeps the decode mask itself only where it knows the mask's form: plain full attention
        implementation = getattr(config.get_text_config(decoder=True), "_attn_implementation", None)
        self._own_mask = (implementation in ("sdpa", "eager")
                          and all(type(layer) is StaticLayer for layer in layers))
        self._additive_mask = implementation == "eager"
        # a model without attention layers (Mamba) has nothing to mask in a decode step; transformers' Mamba would
        # broadcast a 2D mask longer than the step's one token over it
        self._attention_free = not any(isinstance(layer, StaticLayer) for layer in layers)
        super().__init__(model, max_num_seqs)

    @classmethod
    def from_pretrained(cls, folder, device: str | None = None, dtype: torch.dtype | None = None,
                        max_num_seqs: int = 256) -> TransformersEngine:
        """The engine on the causal LM in ``folder``, loaded strictly (``posttrain.families.load_causal_lm``), in
        eval mode; ``dtype`` None: the checkpoint's."""
        from posttrain.families import load_causal_lm

        model = load_causal_lm(folder, "model", dtype=dtype if dtype is not None else "auto")
        return cls(model.to(device).eval() if device else model.eval(), max_num_seqs=max_num_seqs)

    def _vocab_size(self) -> int:
        return self.model.config.get_text_config(decoder=True).vocab_size

    def _forward(self, input_ids, attention_mask, position_ids, cache, slot: int, **extra) -> torch.Tensor:
        """One forward through the model with the cache; returns the last position's logits."""
        kwargs = {self._cache_kwarg: cache, **extra}
        if self._pass_cache_position:
            kwargs["cache_position"] = torch.arange(slot, slot + input_ids.shape[1], device=input_ids.device)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **kwargs)
        return out.logits[:, -1]

    def _generate_wave(self, prompts, offset, params: SamplingParams, generator, _state, on_step) -> list[Completion]:
        model, device = self.model, self.model.device
        n_prompts = len(prompts)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        max_len = width + params.max_new_tokens
        # left padding: prompt i's tokens take slots width - len_i .. width - 1; slot width + t holds step t's token
        ids = torch.zeros((n_prompts, width), dtype=torch.long)
        keep = torch.zeros((n_prompts, max_len), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            keep[i, width - len(p):width] = True
        ids, keep = ids.to(device), keep.to(device)
        positions = (keep[:, :width].long().cumsum(-1) - 1).clamp(min=0)
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        written = [width]  # slots written once the next forward is done; shared by the engine's own layers
        if self._own_mask:
            cache.layers = [WrittenSlotsLayer(max_len, written) for _ in cache.layers]
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        logits = self._forward(ids, keep[:, :width], positions, cache, 0, **extra)  # each prompt once
        self.stats.prefill_tokens += sum(lengths)
        positions = torch.tensor(lengths, device=device)[:, None]  # the next token's position, per row
        padded = min(lengths) < width  # with no padding, a decode step's token sees every written slot: no mask
        mask = self._decode_mask(keep)

        def select(rows: torch.Tensor) -> None:
            nonlocal keep, positions, mask
            _select_rows(cache, rows)
            keep, positions = keep[rows], positions[rows]
            mask = self._decode_mask(keep)

        def forward(next_tokens: torch.Tensor, step: int) -> torch.Tensor:
            slot = width + step
            keep[:, slot] = True  # the token fed now is visible to itself and every later step
            written[0] = slot + 1
            if self._own_mask:
                if self._additive_mask:
                    mask[..., slot] = 0.0
                # sdpa needs no mask where nothing is padded; eager always adds one
                step_mask = mask[..., :slot + 1] if padded or self._additive_mask else None
            elif self._attention_free:
                step_mask = None
            else:
                step_mask = keep[:, :slot + 1]
            logits = self._forward(next_tokens[:, None], step_mask, positions, cache, slot)
            positions.add_(1)
            return logits

        return self._decode(prompts, offset, params, generator, on_step, logits, select, forward,
                            lambda: _cache_bytes(cache))

    def _decode_mask(self, keep: torch.Tensor) -> torch.Tensor | None:
        """The 4D decode mask the engine keeps itself (a view of ``keep`` for sdpa, an additive copy for eager), or
        None where the model builds its own masks from the 2D one."""
        if not self._own_mask:
            return None
        if not self._additive_mask:
            return keep[:, None, None, :]  # a view: setting keep[:, slot] updates it
        dtype = self.model.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            ~keep, torch.finfo(dtype).min)[:, None, None, :]


class WrittenSlotsLayer(StaticLayer):
    """transformers' ``StaticLayer`` that hands attention only the slots written so far, as views of its buffers.
    ``written`` is one shared list ``[count]`` the engine sets before each forward."""

    # views of a changing length are no static addresses; and a cache that says it is not compileable lets
    # transformers skip building a causal mask for a one-token step with no padding (sdpa needs none)
    is_compileable = False

    def __init__(self, max_cache_len: int, written: list[int]):
        super().__init__(max_cache_len)
        self.written = written

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        end = self.written[0]
        return keys[:, :, :end], values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.written[0], 0


def _select_rows(cache: StaticCache, index: torch.Tensor) -> None:
    """Keep (or repeat) the cache's rows ``index``, in every layer: keys, values, conv and recurrent states."""
    for layer in cache.layers:
        layer.reorder_cache(index)
        if hasattr(layer, "batch_size"):
            layer.batch_size = len(index)


def _cache_bytes(cache: StaticCache) -> int:
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "conv_states", {}).values()) + list(getattr(layer, "recurrent_states", {}).values())
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total
