"""The native generation engine: batched sampling from the in-tree models (the hybrid and dense Granite), for
rollouts and serving.

Prompts of any lengths are prefilled together as one packed row (each prompt once, however many samples it
gets), their states copied G ways, then decoded one token per step with a preallocated state: a fixed-size conv
window and SSM state per Mamba layer, a KV cache for the attention layers only. Finished rows leave the batch, so
they stop costing compute. Returns, per sample, the token ids, the log-probability of each sampled token under the
distribution it was drawn from (temperature-scaled and, with top_k/top_p, truncated and renormalised: vLLM's
``processed_logprobs``, so every engine means the same thing), and why it stopped.
This module never trains and never changes the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from posttrain.models.hybrid.modeling import HybridCache, HybridForCausalLM


@dataclass
class SamplingParams:
    """How to sample. RL defaults: top_p = 1 and top_k = 0 (the untruncated distribution)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    n: int = 1  # samples per prompt
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS
    eos_token_id: int | list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.n < 1:
            raise ValueError(f"top_k must be >= 0 and n >= 1, got top_k={self.top_k}, n={self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_ids(self) -> list[int]:
        ids = list(self.stop_token_ids)
        if not self.ignore_eos and self.eos_token_id is not None:
            ids += [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
        return ids


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    # each sampled token's log-probability under the distribution it was drawn from: temperature-scaled, then
    # truncated by top_k/top_p and renormalised (greedy: the plain distribution)
    logprobs: list[float]
    # "stop": an EOS or stop token was sampled (it is the last token); "length": max_new_tokens; "abort": the
    # ``on_step`` callback asked for the row to stop
    finish_reason: str


@dataclass
class StepTokens:
    """The tokens one decoding step produced, for streaming: ``rows[i]`` (an index into ``generate``'s result,
    prompt-major) got ``token_ids[i]``; ``finish_reasons[i]`` is ``"stop"`` or ``"length"`` if that token is the
    row's last, else None. Rows that finished earlier are absent."""

    rows: list[int]
    token_ids: list[int]
    finish_reasons: list[str | None]


# Called after every step with what it produced; may return result indices whose rows should stop now (a client
# went away): they finish with "abort" and leave the batch.
StepCallback = Callable[[StepTokens], Iterable[int] | None]


@dataclass
class EngineStats:
    steps: int = 0  # decode steps taken
    rows_forwarded: int = 0  # rows that went through a decode step (finished rows do not)
    prefill_tokens: int = 0
    cache_bytes: int = 0  # the largest generation state allocated


class NativeEngine:
    def __init__(self, model: HybridForCausalLM, max_num_seqs: int = 256):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.stats = EngineStats()

    @torch.inference_mode()  # not only no_grad: no version counters or view tracking, ~10% off each decode step
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_step: StepCallback | None = None) -> list[Completion]:
        """Sample ``params.n`` completions per prompt; results are prompt-major (prompt i's j-th at i * n + j).

        ``on_step``, if given, sees each step's tokens as soon as they are sampled (see :data:`StepCallback`)."""
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary (size {vocab}): {bad[:5]}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        per_wave = max(1, self.max_num_seqs // params.n)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            plan = self.model.decode_plan()  # from the weights as they are now: they change between calls in RL
            for start in range(0, len(prompts), per_wave):
                out += self._generate_wave(prompts[start:start + per_wave], start, params, generator, plan, on_step)
        finally:
            self.model.train(was_training)
        return out

    def _generate_wave(self, prompts, offset, params: SamplingParams, generator, plan, on_step=None) -> list[Completion]:
        model, device = self.model, self.model.device
        n_prompts, n = len(prompts), params.n
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        cache = HybridCache.allocate(model.config, n_prompts, max_len, device=device, dtype=model.dtype)
        logits = model.prefill(prompts, cache)  # each prompt once
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        if n > 1:  # copy each prompt's state G ways
            rows = torch.arange(n_prompts, device=device).repeat_interleave(n)
            cache, logits = cache.index_select(rows), logits.index_select(0, rows)
        self.stats.cache_bytes = max(self.stats.cache_bytes, cache.nbytes())
        total = n_prompts * n
        tokens: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        reasons = ["length"] * total
        active = list(range(total))  # which output each cache row writes to
        stop_ids = params.stop_ids()
        stop = torch.tensor(stop_ids, device=device) if stop_ids else None
        for step in range(params.max_new_tokens):
            next_tokens, next_logprobs = sample(logits, params, generator)
            step_tokens = next_tokens.tolist()
            for row, tok, lp in zip(active, step_tokens, next_logprobs.tolist()):
                tokens[row].append(tok)
                logprobs[row].append(lp)
            last = step + 1 == params.max_new_tokens
            stopped = [] if stop is None else torch.isin(next_tokens, stop).nonzero()[:, 0].tolist()
            for i in stopped:
                reasons[active[i]] = "stop"
            if on_step is not None:
                finish: list[str | None] = ["length" if last else None] * len(active)
                for i in stopped:
                    finish[i] = "stop"
                aborted = on_step(StepTokens([offset * n + row for row in active], step_tokens, finish))
                if aborted and not last:
                    aborted = {a - offset * n for a in aborted}
                    more = [i for i, row in enumerate(active) if row in aborted and finish[i] is None]
                    for i in more:
                        reasons[active[i]] = "abort"
                    stopped = sorted(set(stopped) | set(more))
            if last:
                break
            if stopped:  # finished rows leave the batch
                gone = set(stopped)
                keep_rows = [i for i in range(len(active)) if i not in gone]
                if not keep_rows:
                    break
                keep = torch.tensor(keep_rows, device=device)
                cache, next_tokens = cache.index_select(keep), next_tokens[keep]
                active = [active[i] for i in keep_rows]
            logits = model.step(next_tokens, cache, plan)
            self.stats.steps += 1
            self.stats.rows_forwarded += len(active)
        return [Completion(offset + i // n, tokens[i], logprobs[i], reasons[i]) for i in range(total)]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """Pick one token per row; return it and its log-probability under the distribution it was drawn from: the
    temperature-scaled one, truncated by top_k/top_p and renormalised (for greedy: the plain distribution)."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return tokens, logp.gather(1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    filtered = logp
    if params.top_k and params.top_k < logp.shape[-1]:
        kth = logp.topk(params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logp, order = filtered.sort(dim=-1, descending=True)
        cumulative = sorted_logp.exp().cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logp.exp() >= params.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(filtered, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    if filtered is not logp:
        logp = torch.log_softmax(filtered, dim=-1)  # renormalised over the kept tokens
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
