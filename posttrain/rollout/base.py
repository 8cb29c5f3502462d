"""What every rollout engine shares: how to sample (``SamplingParams``), what comes back (``Completion``), the
shared sampler, the ``Engine`` protocol with its declared capabilities, and the error a bad choice of engine raises
(``posttrain.rollout.registry`` chooses engines by name).

An engine turns token-id prompts into completions: ``generate(prompt_ids, params) -> list[Completion]``, prompt-major
(prompt i's j-th sample at ``i * params.n + j``). Each completion carries the sampled token ids, each token's
log-probability under the distribution it was drawn from (temperature-scaled, then truncated by top_k/top_p and
renormalised: vLLM's ``processed_logprobs``; greedy: the plain distribution), and why it stopped. Everything else an
engine may do is an explicit capability (``Capabilities``): taking new weights from a trainer, sleeping and waking
(giving its memory back between rollouts), streaming each step's tokens, being closed. A command states what it
needs, and ``build_engine`` refuses an engine that lacks it, or that cannot run the model's family, before any work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch


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


class DecodeRows:
    """The bookkeeping every engine's decode loop shares, for one wave of ``total`` rows (prompt-major, ``n`` per
    prompt; ``offset`` is the wave's first prompt in the whole call): each row's tokens, log-probabilities and why it
    stopped; which rows are still in the batch (``active``: batch row -> result row); stop tokens; the ``on_step``
    callback, whose aborts finish rows with "abort". The engine samples, then calls :meth:`record`, and selects its
    state's rows when some leave."""

    def __init__(self, total: int, n: int, offset: int, params: SamplingParams, device,
                 on_step: StepCallback | None = None):
        self.n, self.offset, self.max_new_tokens, self.on_step = n, offset, params.max_new_tokens, on_step
        self.tokens: list[list[int]] = [[] for _ in range(total)]
        self.logprobs: list[list[float]] = [[] for _ in range(total)]
        self.reasons = ["length"] * total
        self.active = list(range(total))  # which result row each batch row writes to
        stop_ids = params.stop_ids()
        self.stop = torch.tensor(stop_ids, device=device) if stop_ids else None
        self.done = False

    def record(self, step: int, next_tokens: torch.Tensor, next_logprobs: torch.Tensor) -> list[int] | None:
        """Record step ``step``'s sampled tokens. Sets ``done`` when the loop is over (the last step, or every row
        finished); otherwise returns the batch rows that go on when some finished (select them, in this order, from
        the state and from ``next_tokens``), or None when every row goes on."""
        step_tokens = next_tokens.tolist()
        for row, tok, lp in zip(self.active, step_tokens, next_logprobs.tolist()):
            self.tokens[row].append(tok)
            self.logprobs[row].append(lp)
        last = step + 1 == self.max_new_tokens
        stopped = [] if self.stop is None else torch.isin(next_tokens, self.stop).nonzero()[:, 0].tolist()
        for i in stopped:
            self.reasons[self.active[i]] = "stop"
        if self.on_step is not None:
            first = self.offset * self.n
            finish: list[str | None] = ["length" if last else None] * len(self.active)
            for i in stopped:
                finish[i] = "stop"
            aborted = self.on_step(StepTokens([first + row for row in self.active], step_tokens, finish))
            if aborted and not last:
                aborted = {a - first for a in aborted}
                more = [i for i, row in enumerate(self.active) if row in aborted and finish[i] is None]
                for i in more:
                    self.reasons[self.active[i]] = "abort"
                stopped = sorted(set(stopped) | set(more))
        if last:
            self.done = True
            return None
        if not stopped:
            return None
        gone = set(stopped)
        keep = [i for i in range(len(self.active)) if i not in gone]
        self.active = [self.active[i] for i in keep]
        self.done = not keep
        return keep

    def completions(self) -> list[Completion]:
        return [Completion(self.offset + i // self.n, self.tokens[i], self.logprobs[i], self.reasons[i])
                for i in range(len(self.tokens))]


class ModuleEngine(ABC):
    """What the engines that decode a module in this process (``self.model``) share: ``generate``'s checks, seeded
    generator, waves of at most ``max_num_seqs`` rows and eval mode; and weight sync (the trainer's own module needs
    none; a copy takes the trainer's state, or a rollout server's received tensors, strictly). A subclass decodes one
    wave in ``_generate_wave(prompts, offset, params, generator, state, on_step)``, with ``state`` what its
    ``_prepare()`` made once per call (the native engine's decode plan)."""

    model: torch.nn.Module
    max_num_seqs: int

    def _vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _prepare(self):
        return None

    @abstractmethod
    def _generate_wave(self, prompts, offset, params, generator, state, on_step) -> list[Completion]:
        """Decode one wave of prompts (results prompt-major, prompt indices counted from ``offset``)."""

    @torch.inference_mode()  # not only no_grad: no version counters or view tracking, ~10% off each decode step
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 on_step: StepCallback | None = None) -> list[Completion]:
        """Sample ``params.n`` completions per prompt; results are prompt-major (prompt i's j-th at i * n + j).

        ``on_step``, if given, sees each step's tokens as soon as they are sampled (see :data:`StepCallback`)."""
        if not prompt_ids:
            return []
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        vocab = self._vocab_size()
        for i, p in enumerate(prompt_ids):
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
            state = self._prepare()
            for start in range(0, len(prompt_ids), per_wave):
                out += self._generate_wave(prompt_ids[start:start + per_wave], start, params, generator, state,
                                           on_step)
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Take ``model``'s weights (a no-op when it is the module this engine decodes); returns the tensors taken."""
        if model is self.model:
            return 0
        state = model.state_dict()
        self.model.load_state_dict(state, strict=True)
        return len(state)

    @torch.no_grad()
    def load_named_tensors(self, items) -> None:
        """Load ``(checkpoint name, tensor)`` pairs, every tensor of the model (what a rollout server received)."""
        self.model.load_state_dict(dict(items), strict=True)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do besides ``generate``; each true flag promises the method beside it."""

    # sync_weights(model): take the trainer's current weights; load_named_tensors(items): take (checkpoint name,
    # tensor) pairs, as a rollout server receives them
    weight_sync: bool = False
    sleep: bool = False  # sleep() / wake(): give accelerator memory back between rollouts
    streaming: bool = False  # generate(..., on_step=callback): see each step's tokens as they are sampled
    close: bool = False  # close(): release what the engine holds (processes, folders, connections)
    # decodes with the module it was given, in this process: given the trainer's policy it sees every optimizer
    # step as it is taken (sync_weights is then a no-op), and in float32 its log-probabilities are the trainer's own,
    # so GRPO may use them as the old policy's instead of recomputing them; an engine with its own copy of the
    # weights (vLLM, a server) has some mismatch built in, which GRPO corrects by default
    shares_module: bool = False

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


@runtime_checkable
class Engine(Protocol):
    """A rollout engine. ``capabilities`` says which optional methods it has (see :class:`Capabilities`)."""

    name: str
    capabilities: Capabilities

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]: ...


class EngineError(ValueError):
    """A bad engine choice: an unknown name, a model family it cannot run, a capability it lacks."""


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
        # the mass is counted on what top-k kept, renormalised (transformers' warpers and vLLM's sampler do the same)
        kept = filtered if filtered is logp else torch.log_softmax(filtered, dim=-1)
        sorted_logp, order = kept.sort(dim=-1, descending=True)
        cumulative = sorted_logp.exp().cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logp.exp() >= params.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(filtered, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    if filtered is not logp:
        logp = torch.log_softmax(filtered, dim=-1)  # renormalised over the kept tokens
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
