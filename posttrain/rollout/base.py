"""What every rollout engine shares: how to sample (``SamplingParams``), what comes back (``Completion``), the
shared sampler and decode loop, the ``Engine`` protocol with its declared capabilities, and the error a bad choice
of engine raises (``posttrain.rollout.registry`` chooses engines by name).

An engine turns token-id prompts into completions: ``generate(prompt_ids, params) -> list[Completion]``, prompt-major
(prompt i's j-th sample at ``i * params.n + j``). A request may also ask for vLLM's features (penalties,
``min_tokens``, ``logit_bias``, reported log-probabilities, a grammar): the in-process engines apply them in one
shared step (``DecodeRows.decode`` with ``LogitsProcessors``), built only when asked for, so a plain step does what
it always did. Everything else an engine may do is an explicit capability (``Capabilities``); a command states what
it needs, and ``build_engine`` refuses an engine that lacks it, or that cannot run the model's family, before any work.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from posttrain.sampling import SamplingSettings

if TYPE_CHECKING:  # importing xgrammar is the constrained module's business, not every engine's
    from posttrain.rollout.constrained import ConstraintFactory


MAX_LOGPROBS = 20  # the most alternatives a step reports (vLLM's default max_logprobs)
PROMPT_LOGITS_BYTES = 512 * 1024**2  # the float32 logits one batch of prompt_logprobs may hold
LOGPROBS_MODES = ("raw", "processed")


@dataclass
class SamplingParams(SamplingSettings):
    """How to sample: ``max_new_tokens``, ``temperature``, ``top_p`` and ``top_k`` (``SamplingSettings``, with RL's
    defaults: the untruncated distribution), ``n`` samples per prompt, and what follows.

    The fields after ``seed`` are a request's features, with vLLM's (and OpenAI's) meanings; each step applies them
    in vLLM's order: ``logit_bias``, the ``min_tokens`` mask, ``repetition_penalty``, then ``presence_penalty`` and
    ``frequency_penalty``, the ``constraint``'s grammar mask; then temperature, top-k and top-p, and the sampler.
    Left at their defaults, a step does exactly what it did without them (``has_features`` is false)."""

    n: int = 1  # samples per prompt
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS
    eos_token_id: int | list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    # logits -= presence_penalty for every token the row generated so far, in [-2, 2]
    presence_penalty: float = 0.0
    # logits -= frequency_penalty * how often the row generated the token so far, in [-2, 2]
    frequency_penalty: float = 0.0
    # tokens of the row's prompt or generated so far: a positive logit is divided by it, a negative one multiplied
    repetition_penalty: float = 1.0
    # EOS and the stop tokens cannot be sampled before this many tokens are generated (unless a complete grammar
    # allows nothing else)
    min_tokens: int = 0
    # token id -> added to its logit, in [-100, 100]; generate checks the ids against the model's vocabulary
    logit_bias: dict[int, float] | None = None
    # None: no report; k in 0..20: per generated token, the sampled token's log-probability and the k most likely
    # tokens' (Completion.reported_logprobs / top_logprobs), under the distribution logprobs_mode names
    logprobs: int | None = None
    # "raw": log_softmax of the model's logits as they come (vLLM's raw_logprobs); "processed": the distribution
    # sampled from (after the features, temperature, top-k/top-p renormalised; greedy: the processed logits')
    logprobs_mode: str = "raw"
    constraint: ConstraintFactory | None = None  # a grammar the completion must follow (rollout.constrained)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:  # nan too
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.constraint is not None and not callable(getattr(self.constraint, "rows", None)):
            raise ValueError("constraint must be a posttrain.rollout.constrained.ConstraintFactory, got "
                             f"{type(self.constraint).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_features(self) -> bool:
        """Whether a step does more than sample: a penalty, min_tokens, a bias, a report or a grammar is asked for."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.min_tokens or self.logit_bias or self.logprobs is not None
                    or self.constraint is not None)

    def stop_ids(self) -> list[int]:
        ids = list(self.stop_token_ids)
        if not self.ignore_eos and self.eos_token_id is not None:
            ids += [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
        return ids

    def check_vocabulary(self, vocab_size: int) -> None:
        """The checks that need the model's vocabulary: ``logit_bias`` ids and the ``constraint``'s vocabulary."""
        bad = sorted(t for t in (self.logit_bias or {}) if t >= vocab_size)
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")
        if self.constraint is not None and self.constraint.vocab_size != vocab_size:
            raise ValueError(f"constraint was compiled for a vocabulary of {self.constraint.vocab_size} tokens; the "
                             f"model has {vocab_size}")


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
    # with params.logprobs set: each sampled token's log-probability under params.logprobs_mode's distribution, and
    # per token the params.logprobs most likely (token id, log-probability) pairs, highest first
    reported_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class StepTokens:
    """The tokens one decoding step produced, for streaming: ``rows[i]`` (an index into ``generate``'s result,
    prompt-major) got ``token_ids[i]``; ``finish_reasons[i]`` is ``"stop"`` or ``"length"`` if that token is the
    row's last, else None. Rows that finished earlier are absent."""

    rows: list[int]
    token_ids: list[int]
    finish_reasons: list[str | None]
    # when the parameters ask for reports (``logprobs``): each token's reported log-prob and top alternatives
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


# Called after every step with what it produced; may return result indices whose rows should stop now (a client
# went away): they finish with "abort" and leave the batch.
StepCallback = Callable[[StepTokens], Iterable[int] | None]


@dataclass
class EngineStats:
    steps: int = 0  # decode steps taken
    rows_forwarded: int = 0  # rows that went through a decode step (finished rows do not)
    prefill_tokens: int = 0
    cache_bytes: int = 0  # the largest generation state allocated


class LogitsProcessors:
    """The request features of :class:`SamplingParams` for one wave's rows (prompt-major, ``n`` per prompt): the
    per-row state they need (how often each row generated each token; which tokens its prompt or completion holds;
    its grammar matcher) and the step that turns the model's logits into the ones sampled from. Built only when the
    params have features, so a plain step never pays for them."""

    def __init__(self, params: SamplingParams, prompts: list[list[int]], vocab_size: int, device):
        self.params = params
        rows = len(prompts) * params.n
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            self.bias[torch.tensor(list(params.logit_bias), device=device)] = torch.tensor(
                list(params.logit_bias.values()), device=device)
        stop_ids = params.stop_ids()
        self.min_stop = torch.tensor(stop_ids, device=device) if params.min_tokens and stop_ids else None
        self.seen = None  # (rows, vocab) bool: in the prompt or generated, for the repetition penalty
        if params.repetition_penalty != 1:
            seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=device)] = True
            self.seen = seen.repeat_interleave(params.n, dim=0)
        self.counts = None  # (rows, vocab) float: how often each row generated each token
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(rows, vocab_size, device=device)
        self.grammar = params.constraint.rows(rows, stop_ids) if params.constraint is not None else None

    def apply(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """The logits to sample step ``step`` from (float32, a new tensor; ``logits`` is left as it is)."""
        p = self.params
        out = logits.float().clone()
        if self.bias is not None:
            out += self.bias
        if self.min_stop is not None and step < p.min_tokens:
            out[:, self.min_stop] = float("-inf")
        if self.seen is not None:
            penalised = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            out = torch.where(self.seen, penalised, out)
        if self.counts is not None:
            out -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        if self.grammar is not None:
            self.grammar.mask_(out)
            if self.min_stop is not None and step < p.min_tokens:
                # a complete grammar allows only the stop tokens, which min_tokens masks: the grammar wins (the
                # row cannot go on), else nothing could be sampled
                dead = torch.isneginf(out).all(dim=-1)
                if dead.any():
                    out[dead.nonzero()[:, 0][:, None], self.min_stop] = 0.0
        return out

    def advance(self, tokens: torch.Tensor) -> list[int]:
        """Take each batch row's sampled token; returns the batch rows whose grammar is now complete."""
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True
        return self.grammar.advance(tokens.tolist()) if self.grammar is not None else []

    def select(self, keep: list[int]) -> None:
        """Keep the batch rows ``keep``, in this order (the rows that go on after some finished)."""
        if self.counts is not None or self.seen is not None:
            index = torch.tensor(keep, device=(self.counts if self.counts is not None else self.seen).device)
            if self.counts is not None:
                self.counts = self.counts[index]
            if self.seen is not None:
                self.seen = self.seen[index]
        if self.grammar is not None:
            self.grammar.select(keep)


class DecodeRows:
    """The bookkeeping of the decode loop (``ModuleEngine._decode``) for one wave of ``prompts`` (rows prompt-major,
    ``n`` per prompt; ``offset`` is the wave's first prompt in the whole call): each row's tokens, log-probabilities
    and why it stopped; which rows are still in the batch (``active``: batch row -> result row); the request features
    (:class:`LogitsProcessors`) and their reports; the ``on_step`` callback, whose aborts finish rows with "abort"."""

    def __init__(self, prompts: list[list[int]], offset: int, params: SamplingParams, device,
                 on_step: StepCallback | None = None):
        total = len(prompts) * params.n
        self.prompts, self.params = prompts, params
        self.n, self.offset, self.max_new_tokens, self.on_step = params.n, offset, params.max_new_tokens, on_step
        self.tokens: list[list[int]] = [[] for _ in range(total)]
        self.logprobs: list[list[float]] = [[] for _ in range(total)]
        self.reasons = ["length"] * total
        self.active = list(range(total))  # which result row each batch row writes to
        stop_ids = params.stop_ids()
        self.stop = torch.tensor(stop_ids, device=device) if stop_ids else None
        self.done = False
        self.plain = not params.has_features  # a plain step samples and records, nothing more
        self.processors: LogitsProcessors | None = None  # made at the first step, which knows the vocabulary
        report = params.logprobs is not None
        self.reported: list[list[float]] | None = [[] for _ in range(total)] if report else None
        self.top: list[list[list[tuple[int, float]]]] | None = [[] for _ in range(total)] if report else None

    def decode(self, step: int, logits: torch.Tensor, generator: torch.Generator | None):
        """Sample step ``step`` from the model's ``logits`` (one row per active row) and record it. Returns the
        sampled tokens and, as :meth:`record`, the batch rows that go on when some finished (else None)."""
        params = self.params
        if self.plain:
            tokens, logprobs = sample(logits, params, generator)
            return tokens, self.record(step, tokens, logprobs)
        if self.processors is None:
            self.processors = LogitsProcessors(params, self.prompts, logits.shape[-1], logits.device)
        processed = self.processors.apply(step, logits)
        tokens, logp = _sample(processed, params, generator)
        if params.logprobs is not None:
            self._report(torch.log_softmax(logits.float(), dim=-1) if params.logprobs_mode == "raw" else logp,
                         tokens)
        complete = self.processors.advance(tokens)
        return tokens, self.record(step, tokens, logp.gather(1, tokens[:, None])[:, 0], complete)

    def _report(self, logp: torch.Tensor, tokens: torch.Tensor) -> None:
        for row, lp in zip(self.active, logp.gather(1, tokens[:, None])[:, 0].tolist()):
            self.reported[row].append(lp)
        k = self.params.logprobs
        if k:
            values, ids = logp.topk(k, dim=-1)
            for row, v, i in zip(self.active, values.tolist(), ids.tolist()):
                self.top[row].append(list(zip(i, v)))
        else:
            for row in self.active:
                self.top[row].append([])

    def record(self, step: int, next_tokens: torch.Tensor, next_logprobs: torch.Tensor,
               complete: list[int] = ()) -> list[int] | None:
        """Record step ``step``'s sampled tokens (``complete``: batch rows whose grammar ended, which stop too).
        Sets ``done`` when the loop is over (the last step, or every row finished); otherwise returns the batch rows
        that go on when some finished (select them, in this order, from the state and from ``next_tokens``), or
        None when every row goes on."""
        step_tokens = next_tokens.tolist()
        for row, tok, lp in zip(self.active, step_tokens, next_logprobs.tolist()):
            self.tokens[row].append(tok)
            self.logprobs[row].append(lp)
        last = step + 1 == self.max_new_tokens
        stopped = [] if self.stop is None else torch.isin(next_tokens, self.stop).nonzero()[:, 0].tolist()
        if complete:
            stopped = sorted(set(stopped) | set(complete))
        for i in stopped:
            self.reasons[self.active[i]] = "stop"
        if self.on_step is not None:
            first = self.offset * self.n
            finish: list[str | None] = ["length" if last else None] * len(self.active)
            for i in stopped:
                finish[i] = "stop"
            reports = {}
            if self.reported is not None:
                reports = {"logprobs": [self.reported[row][-1] for row in self.active],
                           "top_logprobs": [self.top[row][-1] for row in self.active]}
            aborted = self.on_step(StepTokens([first + row for row in self.active], step_tokens, finish, **reports))
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
        if self.processors is not None and keep:
            self.processors.select(keep)
        return keep

    def completions(self) -> list[Completion]:
        return [Completion(self.offset + i // self.n, self.tokens[i], self.logprobs[i], self.reasons[i],
                           self.reported[i] if self.reported is not None else None,
                           self.top[i] if self.top is not None else None)
                for i in range(len(self.tokens))]


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
    # prompt_logprobs(prompt_ids, top_n): each prompt token's log-probability given the ones before it (``echo``)
    prompt_logprobs: bool = False

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


class ModuleEngine(ABC):
    """What the engines that decode a module in this process (``self.model``) share: ``generate``'s checks, seeded
    generator, waves of at most ``max_num_seqs`` rows and eval mode; and weight sync (the trainer's own module needs
    none; a copy takes the trainer's state, or a rollout server's received tensors, strictly). A subclass decodes one
    wave in ``_generate_wave(prompts, offset, params, generator, state, on_step)``, with ``state`` what its
    ``_prepare()`` made once per call (the native engine's decode plan)."""

    capabilities = Capabilities(weight_sync=True, streaming=True, shares_module=True, prompt_logprobs=True)
    model: torch.nn.Module
    max_num_seqs: int

    def __init__(self, model: torch.nn.Module, max_num_seqs: int = 256):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.stats = EngineStats()

    def _vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _prepare(self):
        return None

    @abstractmethod
    def _generate_wave(self, prompts, offset, params, generator, state, on_step) -> list[Completion]:
        """Decode one wave of prompts (results prompt-major, prompt indices counted from ``offset``)."""

    def _decode(self, prompts, offset, params: SamplingParams, generator, on_step, logits: torch.Tensor,
                select, forward, state_bytes) -> list[Completion]:
        """The decode loop of a wave, after the engine's prefill gave ``logits`` (a row per prompt): each prompt's
        row copied ``params.n`` ways, then a token sampled per step until every row stopped. The engine's own state
        goes through three callbacks: ``select(rows)`` keeps its per-row state at ``rows`` (a long tensor, in that
        order: the copies, then the rows that go on when some finished), ``forward(tokens, step)`` feeds step
        ``step``'s tokens and returns the next logits, ``state_bytes()`` measures its cache once the copies exist."""
        device = logits.device
        if params.n > 1:
            rows = torch.arange(len(prompts), device=device).repeat_interleave(params.n)
            select(rows)
            logits = logits.index_select(0, rows)
        self.stats.cache_bytes = max(self.stats.cache_bytes, state_bytes())
        book = DecodeRows(prompts, offset, params, device, on_step)
        for step in range(params.max_new_tokens):
            next_tokens, kept = book.decode(step, logits, generator)
            if book.done:
                break
            if kept is not None:  # finished rows leave the batch
                index = torch.tensor(kept, device=device)
                select(index)
                next_tokens = next_tokens[index]
            logits = forward(next_tokens, step)
            self.stats.steps += 1
            self.stats.rows_forwarded += len(book.active)
        return book.completions()

    @torch.inference_mode()  # not only no_grad: no version counters or view tracking, ~10% off each decode step
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 on_step: StepCallback | None = None) -> list[Completion]:
        """Sample ``params.n`` completions per prompt; results are prompt-major (prompt i's j-th at i * n + j).

        ``on_step``, if given, sees each step's tokens as soon as they are sampled (see :data:`StepCallback`)."""
        if not prompt_ids:
            return []
        self._check_prompts(prompt_ids)
        params.check_vocabulary(self._vocab_size())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        per_wave = max(1, self.max_num_seqs // params.n)
        out: list[Completion] = []
        with self._eval_mode():
            state = self._prepare()
            for start in range(0, len(prompt_ids), per_wave):
                out += self._generate_wave(prompt_ids[start:start + per_wave], start, params, generator, state,
                                           on_step)
        return out

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _check_prompts(self, prompt_ids: list[list[int]]) -> None:
        vocab = self._vocab_size()
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary (size {vocab}): {bad[:5]}")

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[list[int]], top_n: int
                        ) -> list[list[tuple[float, list[tuple[int, float]]] | None]]:
        """Per prompt, per position: None for the first token, else (its log-probability given the tokens before
        it, the ``top_n`` most likely (token id, log-probability) pairs there, highest first); the model's raw
        log_softmax in float32. Prompts go through in right-padded batches of at most ``max_num_seqs``: the model
        is causal, so the padding after a prompt changes none of its positions."""
        if not 0 <= top_n <= MAX_LOGPROBS:
            raise ValueError(f"top_n must be in [0, {MAX_LOGPROBS}], got {top_n}")
        if not prompt_ids:
            return []
        self._check_prompts(prompt_ids)
        device = self.model.device
        out: list[list[tuple[float, list[tuple[int, float]]] | None]] = []
        with self._eval_mode():
            for batch in self._logit_batches(prompt_ids):
                width = max(len(p) for p in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, p in enumerate(batch):
                    ids[i, :len(p)] = torch.tensor(p)
                    mask[i, :len(p)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
                chosen = logp.gather(2, ids[:, 1:, None])[..., 0].tolist()
                top_values, top_ids = (x.tolist() for x in logp.topk(top_n, dim=-1))  # top_n 0: empty lists
                for i, p in enumerate(batch):
                    entries: list[tuple[float, list[tuple[int, float]]] | None] = [None]
                    entries += [(chosen[i][t], list(zip(top_ids[i][t], top_values[i][t]))) for t in range(len(p) - 1)]
                    out.append(entries)
        return out

    def _logit_batches(self, prompt_ids: list[list[int]]):
        """Consecutive batches of at most ``max_num_seqs`` prompts whose padded float32 logits stay within
        ``PROMPT_LOGITS_BYTES`` (a prompt longer than that goes alone): a real vocabulary makes every position's
        logits large."""
        vocab, batch, width = self._vocab_size(), [], 0
        for p in prompt_ids:
            wider = max(width, len(p))
            full = len(batch) == self.max_num_seqs or (len(batch) + 1) * wider * vocab * 4 > PROMPT_LOGITS_BYTES
            if batch and full:
                yield batch
                batch, wider = [], len(p)
            batch.append(p)
            width = wider
        if batch:
            yield batch

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
    tokens, logp = _sample(logits, params, generator)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """``sample``'s tokens, and the whole log-distribution they were drawn from (rows, vocab)."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1), torch.log_softmax(logits, dim=-1)
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
    return tokens, logp
