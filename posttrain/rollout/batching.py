"""Batching concurrent generation requests onto one native engine, which is not thread-safe.

One worker thread owns the engine. A request is a job (prompts + sampling parameters) put in a queue; the worker
takes the oldest job and keeps taking jobs while they arrive less than ``gather_s`` apart (at most
``max_gather_s`` after the first, at most ``max_batch_seqs`` sequences): requests arriving while a batch runs
wait in the queue and form the next batch.
Jobs whose sampling parameters agree run as one ``engine.generate`` call, their prompts concatenated and the
token limit the largest of theirs (each job's completions are cut back to its own limit). A job with a seed
never shares a call, so its samples depend on its seed alone. If a merged call fails, its jobs are retried one
by one so that one bad request does not fail the others (except jobs that already streamed tokens: those fail).

A streaming job gives ``on_tokens``: after every engine step it receives its own new tokens, as
``(choice index, token id, finish reason or None)`` triples, already cut to its own token limit. ``cancel`` a
job's handle (its client went away) and its rows leave the running batch at the next step.

This module must never call the engine from any thread but the worker's.
"""

from __future__ import annotations

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

TokenSink = Callable[[list[tuple[int, int, str | None]]], None]

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    batches: int = 0  # gathered batches taken from the queue
    engine_calls: int = 0  # engine.generate calls (a batch with jobs of different parameters makes several)
    jobs: int = 0
    batch_jobs: list[int] = field(default_factory=list)  # jobs per batch, most recent last (bounded)


@dataclass
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    future: Future
    key: tuple
    on_tokens: TokenSink | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # some tokens already went to on_tokens

    @property
    def seqs(self) -> int:
        return len(self.prompts) * self.params.n


_unique = itertools.count()


def merge_key(params: SamplingParams) -> tuple:
    """Jobs with equal keys can share one engine call (everything but ``max_new_tokens`` agrees)."""
    stops = (tuple(sorted(params.stop_ids())),)
    if params.greedy:
        return ("greedy", params.n, stops)
    if params.seed is not None:
        return ("seeded", next(_unique))
    return ("sampled", params.temperature, params.top_p, params.top_k, params.n, stops)


class BatchScheduler:
    """Serialises ``engine.generate`` through one worker thread, batching jobs that arrive together."""

    def __init__(self, engine, gather_s: float = 0.02, max_batch_seqs: int = 256, max_gather_s: float | None = None):
        if gather_s < 0 or max_batch_seqs < 1:
            raise ValueError(f"gather_s must be >= 0 and max_batch_seqs >= 1, got {gather_s}, {max_batch_seqs}")
        self.engine = engine
        self.gather_s = gather_s
        self.max_gather_s = 10 * gather_s if max_gather_s is None else max(max_gather_s, gather_s)
        self.max_batch_seqs = max_batch_seqs
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
        future: Future = Future()
        job = _Job([list(p) for p in prompts], params, future, merge_key(params), on_tokens)
        future.job = job  # for cancel()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            self._queue.append(job)
            self._cond.notify()
        return future

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
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._worker.join(timeout)

    # -- worker -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop cancelled jobs
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.batch_jobs = (self.stats.batch_jobs + [len(batch)])[-1000:]
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._run_group(jobs)

    def _gather(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            seqs = batch[0].seqs
            start = time.monotonic()
            deadline = start + self.gather_s
            while seqs < self.max_batch_seqs and not self._closed:
                if self._queue:
                    if seqs + self._queue[0].seqs > self.max_batch_seqs:
                        break
                    job = self._queue.popleft()
                    batch.append(job)
                    seqs += job.seqs
                    # another arrival: wait a little longer for its company, but never past max_gather_s
                    deadline = min(time.monotonic() + self.gather_s, start + self.max_gather_s)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run_group(self, jobs: list[_Job]) -> None:
        try:
            results = self._generate(jobs)
        except Exception as exc:  # noqa: BLE001 - delivered to the requests below
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            logger.warning("a merged batch of %d jobs failed (%s); retrying them one by one", len(jobs), exc)
            for job in jobs:
                if job.streamed:  # its client has seen tokens: a rerun would send them twice
                    job.future.set_exception(exc)
                else:
                    self._run_group([job])
            return
        for job, completions in zip(jobs, results, strict=True):
            job.future.set_result(completions)

    def _generate(self, jobs: list[_Job]) -> list[list[Completion]]:
        params = dataclasses.replace(jobs[0].params, max_new_tokens=max(j.params.max_new_tokens for j in jobs))
        prompts = [p for job in jobs for p in job.prompts]
        if any(job.on_tokens is not None or job.cancelled.is_set() for job in jobs):
            completions = self.engine.generate(prompts, params, on_step=_StepRouter(jobs))
        else:
            completions = self.engine.generate(prompts, params)
        self.stats.engine_calls += 1
        out, start = [], 0
        for job in jobs:
            mine = completions[start * params.n: (start + len(job.prompts)) * params.n]
            out.append([_cut(c, c.prompt_index - start, job.params.max_new_tokens) for c in mine])
            start += len(job.prompts)
        return out


class _StepRouter:
    """The engine's step callback for one merged call: hands each job its own tokens (cut to its own limit) and
    returns the rows of cancelled jobs, and of jobs past their own limit, so that they stop costing compute."""

    def __init__(self, jobs: list[_Job]):
        self.owner: list[tuple[_Job, int]] = []  # result index -> (job, choice index in the job)
        for job in jobs:
            self.owner += [(job, i) for i in range(job.seqs)]
        self.counts = [0] * len(self.owner)

    def __call__(self, step: StepTokens) -> list[int]:
        per_job: dict[int, tuple[_Job, list]] = {}
        done = []
        for row, token, reason in zip(step.rows, step.token_ids, step.finish_reasons, strict=True):
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
                per_job.setdefault(id(job), (job, []))[1].append((choice, token, reason))
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
    return Completion(prompt_index, completion.token_ids[:max_new_tokens], completion.logprobs[:max_new_tokens],
                      "length")
