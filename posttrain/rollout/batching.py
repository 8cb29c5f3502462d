"""Batching concurrent generation requests onto one engine, which is not thread-safe, fairly.

One worker thread owns the engine. A request is a job (prompts + sampling parameters) put in a queue, in pieces of at
most ``piece_seqs`` sequences (prompts x n). The worker takes the oldest job's next piece and keeps taking pieces, one
per waiting job in turn, while they arrive less than ``gather_s`` apart (for at most 10 x ``gather_s`` after the
first, at most ``max_batch_seqs`` sequences); a job with pieces left goes back to the end of the queue. So a request with a
thousand prompts runs as a series of batches, and a one-prompt request that arrives meanwhile waits for the batch
running now and shares the next one, instead of waiting for the whole of the large one.
Pieces whose sampling parameters agree run as one ``engine.generate`` call, their prompts concatenated and the
token limit the largest of theirs (each job's completions are cut back to its own limit). A job with a seed never
shares a call, so its samples depend on its seed alone: its first piece uses the seed, later pieces seeds derived
from it and the piece's place (the same request on the same server samples the same). If a merged call fails, its
pieces are retried one by one so that one bad request does not fail the others (except jobs that already streamed
tokens: those fail).

A streaming job gives ``on_tokens``: after every engine step it receives its own new tokens, as
``(choice index, token id, finish reason or None, report)`` tuples, already cut to its own token limit (``report``:
the token's ``(log-prob, top alternatives)`` when the parameters ask for log-probs, else None). ``cancel`` a
job's handle (its client went away) and its rows leave the running batch at the next step, its queued pieces are
dropped.

``lock``, if given, is held around every engine call (a rollout server loads new weights under the same lock).
This module must never call the engine from any thread but the worker's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from posttrain.rollout import Completion, SamplingParams, StepTokens

TokenSink = Callable[[list[tuple[int, int, str | None, tuple | None]]], None]

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    batches: int = 0  # gathered batches taken from the queue
    running_jobs: int = 0  # jobs in the batch running now
    waiting_jobs: int = 0  # jobs in the queue that have not started


@dataclass(eq=False)
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    future: Future
    key: tuple
    on_tokens: TokenSink | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # some tokens already went to on_tokens
    pieces: deque = field(default_factory=deque)  # (first prompt, end prompt) of the pieces not yet taken
    results: dict = field(default_factory=dict)  # first prompt -> the piece's completions
    started: bool = False
    call: Callable[[], object] | None = None  # run_exclusive's work instead of prompts

    @property
    def seqs(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass(eq=False)
class _Piece:
    """Prompts ``start:end`` of a job, with the sampling parameters this piece runs with."""

    job: _Job
    start: int
    end: int
    params: SamplingParams
    key: tuple

    @property
    def seqs(self) -> int:
        return (self.end - self.start) * self.params.n


_unique = itertools.count()


def merge_key(params: SamplingParams) -> tuple:
    """Jobs with equal keys can share one engine call (everything but ``max_new_tokens`` agrees; for greedy jobs,
    the sampling knobs greedy ignores need not)."""
    if params.seed is not None and not params.greedy:
        return ("seeded", next(_unique))
    ignored = {"max_new_tokens", "seed"} | ({"temperature", "top_p", "top_k"} if params.greedy else set())
    return tuple((f.name, repr(getattr(params, f.name))) for f in dataclasses.fields(params) if f.name not in ignored)


def _piece_seed(seed: int, index: int) -> int:
    """The seed of a seeded job's ``index``-th piece: the job's own for the first, then distinct derived ones."""
    return seed if index == 0 else (seed * 1_000_003 + index * 7_919) % (2**63 - 1)


class BatchScheduler:
    """Serialises ``engine.generate`` through one worker thread, batching jobs that arrive together (see the
    module docstring)."""

    def __init__(self, engine, gather_s: float = 0.02, max_batch_seqs: int = 256, piece_seqs: int = 16,
                 lock: threading.Lock | None = None):
        if gather_s < 0 or max_batch_seqs < 1 or piece_seqs < 1:
            raise ValueError(f"gather_s must be >= 0, max_batch_seqs and piece_seqs >= 1, got {gather_s}, "
                             f"{max_batch_seqs}, {piece_seqs}")
        self.engine = engine
        self.gather_s = gather_s
        self.max_gather_s = 10 * gather_s
        self.max_batch_seqs = max_batch_seqs
        self.piece_seqs = min(piece_seqs, max_batch_seqs)
        self.lock = lock
        self.streaming = engine.capabilities.streaming  # only a streaming engine takes on_step (and drops rows)
        self.stats = SchedulerStats()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="posttrain-batch-worker", daemon=True)
        self._worker.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams, on_tokens: TokenSink | None = None) -> Future:
        """Queue a job; the future resolves to its completions (prompt-major, ``prompt_index`` local to the job).

        ``on_tokens`` (called from the worker thread, so it must be quick: put into a queue) streams the job's
        tokens as they are sampled. ``cancel(future)`` stops the job's rows early."""
        job = _Job([list(p) for p in prompts], params, Future(), merge_key(params), on_tokens)
        per_piece = max(1, self.piece_seqs // params.n)
        job.pieces.extend((i, min(i + per_piece, len(job.prompts))) for i in range(0, len(job.prompts), per_piece))
        return self._enqueue(job)

    def run_exclusive(self, fn: Callable[[], object]) -> Future:
        """Queue ``fn()`` to run on the worker thread, alone, in its turn (work on the engine that is not a
        ``generate``, e.g. prompt log-probabilities); the future resolves to its result."""
        return self._enqueue(_Job([], SamplingParams(), Future(), ("call", next(_unique)), call=fn))

    def _enqueue(self, job: _Job) -> Future:
        job.future.job = job  # for cancel()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            self._queue.append(job)
            self.stats.waiting_jobs += 1
            self._cond.notify()
        return job.future

    @staticmethod
    def cancel(future: Future) -> None:
        """Stop a submitted job: dropped if still queued, its rows aborted at the next step if running (its
        completions then end with finish reason "abort")."""
        future.job.cancelled.set()
        future.cancel()  # succeeds only while the job waits in the queue

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Blocking form of :meth:`submit`, with ``NativeEngine.generate``'s signature."""
        return self.submit(prompts, params).result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking jobs, fail the queued ones, and let the running batch finish."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            if job.future.done():
                continue
            if job.started or job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._worker.join(timeout)

    # -- worker -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if not batch:
                continue
            if batch[0].job.call is not None:  # run_exclusive's work, alone
                self._call(batch[0].job)
                continue
            self.stats.batches += 1
            self.stats.running_jobs = len({id(piece.job) for piece in batch})
            groups: dict[tuple, list[_Piece]] = {}
            for piece in batch:
                groups.setdefault(piece.key, []).append(piece)
            for pieces in groups.values():
                self._run_group(pieces)
            self.stats.running_jobs = 0

    def _take(self) -> _Piece | None:
        """The next piece of the job at the head of the queue (the job goes to the back if it has more), or None
        when that job is over (cancelled, failed): it leaves the queue."""
        job = self._queue.popleft()
        if not job.started:
            job.started = True
            self.stats.waiting_jobs -= 1
            if not job.future.set_running_or_notify_cancel():  # cancelled while queued
                return None
            if job.cancelled.is_set():  # cancelled after its future started: end it
                job.future.set_exception(RuntimeError("cancelled"))
                return None
        elif job.cancelled.is_set() or job.future.done():
            return None
        if job.call is not None:
            return _Piece(job, 0, 0, job.params, job.key)
        start, end = job.pieces.popleft()
        if job.pieces:
            self._queue.append(job)
        params = job.params
        if params.seed is not None and start > 0:
            params = dataclasses.replace(params, seed=_piece_seed(params.seed, start))
        return _Piece(job, start, end, params, job.key)

    def _gather(self) -> list[_Piece] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch: list[_Piece] = []
            taken: set[int] = set()  # ids of the jobs with a piece in this batch: one piece per job per batch
            seqs = 0
            start = time.monotonic()
            deadline = start + self.gather_s
            while seqs < self.max_batch_seqs and not self._closed:
                fresh = [job for job in self._queue if id(job) not in taken]
                if fresh:
                    head = fresh[0]
                    while self._queue[0] is not head:  # jobs already in the batch keep their turn for the next
                        self._queue.rotate(-1)
                    if head.call is not None:  # run_exclusive's work runs alone
                        if batch:
                            break
                        piece = self._take()
                        return [piece] if piece is not None else []
                    first, end = head.pieces[0]
                    if batch and seqs + (end - first) * head.params.n > self.max_batch_seqs:
                        break
                    taken.add(id(head))
                    piece = self._take()
                    if piece is not None:
                        batch.append(piece)
                        seqs += piece.seqs
                    # another arrival: wait a little longer for its company, but never past max_gather_s
                    deadline = min(time.monotonic() + self.gather_s, start + self.max_gather_s)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run_group(self, pieces: list[_Piece]) -> None:
        pieces = [p for p in pieces if not p.job.future.done()]
        if not pieces:
            return
        try:
            results = self._generate(pieces)
        except Exception as exc:  # noqa: BLE001 - delivered to the requests below
            if len(pieces) == 1:
                self._fail(pieces[0].job, exc)
                return
            logger.warning("a merged batch of %d pieces failed (%s); retrying them one by one", len(pieces), exc)
            for piece in pieces:
                if piece.job.streamed:  # its client has seen tokens: a rerun would send them twice
                    self._fail(piece.job, exc)
                else:
                    self._run_group([piece])
            return
        for piece, completions in zip(pieces, results, strict=True):
            job = piece.job
            job.results[piece.start] = completions
            if not job.pieces and sum(len(r) for r in job.results.values()) == job.seqs and not job.future.done():
                job.future.set_result([c for first in sorted(job.results) for c in job.results[first]])

    def _call(self, job: _Job) -> None:
        self.stats.running_jobs = 1
        try:
            with self.lock if self.lock is not None else contextlib.nullcontext():
                result = job.call()
        except Exception as exc:  # noqa: BLE001 - delivered to the caller
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            self.stats.running_jobs = 0

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def _generate(self, pieces: list[_Piece]) -> list[list[Completion]]:
        params = dataclasses.replace(pieces[0].params, max_new_tokens=max(p.params.max_new_tokens for p in pieces))
        prompts = [prompt for piece in pieces for prompt in piece.job.prompts[piece.start:piece.end]]
        router = None
        if self.streaming and any(p.job.on_tokens is not None or p.job.cancelled.is_set() for p in pieces):
            router = _StepRouter(pieces)
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if router is not None:
                completions = self.engine.generate(prompts, params, on_step=router)
            else:
                completions = self.engine.generate(prompts, params)
        out, offset = [], 0
        for piece in pieces:
            count = piece.end - piece.start
            mine = completions[offset * params.n: (offset + count) * params.n]
            out.append([_cut(c, c.prompt_index - offset + piece.start, piece.params.max_new_tokens) for c in mine])
            offset += count
        return out


class _StepRouter:
    """The engine's step callback for one merged call: hands each job its own tokens (cut to its own limit) and
    returns the rows of cancelled jobs, and of jobs past their own limit, so that they stop costing compute."""

    def __init__(self, pieces: list[_Piece]):
        self.owner: list[tuple[_Job, int]] = []  # result index -> (job, choice index in the job)
        for piece in pieces:
            n = piece.params.n
            self.owner += [(piece.job, piece.start * n + i) for i in range(piece.seqs)]
        self.counts = [0] * len(self.owner)

    def __call__(self, step: StepTokens) -> list[int]:
        per_job: dict[int, tuple[_Job, list]] = {}
        done = []
        reports = step.logprobs is not None
        for i, (row, token, reason) in enumerate(zip(step.rows, step.token_ids, step.finish_reasons, strict=True)):
            job, choice = self.owner[row]
            if job.cancelled.is_set():
                done.append(row)
                continue
            self.counts[row] += 1
            limit = job.params.max_new_tokens
            if self.counts[row] > limit:
                done.append(row)
                continue
            if self.counts[row] == limit:
                reason = reason or "length"
                done.append(row)
            if job.on_tokens is not None:
                report = (step.logprobs[i], step.top_logprobs[i]) if reports else None
                per_job.setdefault(id(job), (job, []))[1].append((choice, token, reason, report))
        for job, items in per_job.values():
            job.streamed = True
            try:
                job.on_tokens(items)
            except Exception:  # one request's sink must not break the batch
                logger.exception("a streaming callback failed; cancelling its request")
                job.cancelled.set()
        return done


def _cut(completion: Completion, prompt_index: int, max_new_tokens: int) -> Completion:
    if len(completion.token_ids) <= max_new_tokens:
        reason = completion.finish_reason
        if reason == "abort" and len(completion.token_ids) == max_new_tokens:  # stopped at its own limit
            reason = "length"
        return dataclasses.replace(completion, prompt_index=prompt_index, finish_reason=reason)
    per_token = {f.name: value[:max_new_tokens] for f in dataclasses.fields(completion)
                 if isinstance(value := getattr(completion, f.name), list)}  # token ids and their log-probs
    return dataclasses.replace(completion, prompt_index=prompt_index, finish_reason="length", **per_token)
