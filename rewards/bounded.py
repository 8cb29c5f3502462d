"""Calling a reward from a process that is not a reward worker, with the pool's time limit on every sample.

The rule filters, preference-pair scoring and any other caller that would otherwise run a reward in its own
process use :class:`BoundedReward`. It scores here only what the reward decides in time bounded by the texts'
length (its ``quick_scores``: the math reward's extraction and plain numbers), and sends every other sample to a
:class:`~posttrain.rewards.pool.RewardPool` started in this process on first need, where a sample that outlives
``timeout_s`` has its worker killed (SIGKILL) and replaced: sympy stuck in C ignores signals and threads cannot be
killed, so a worker process is the only bound that always holds. A sample that timed out or failed is ``None``
with a :class:`~posttrain.rewards.pool.SampleError` saying why; a configuration error raises.

Calls from several threads are safe: the pool takes one batch at a time and every sample keeps its own limit, so
a thread waits on a pipe, never on sympy. A process forked from the one that started the pool starts its own
pool (pipes cannot be shared). This module never runs a reward's full scoring in the calling process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Self

from posttrain.rewards.base import RewardFn
from posttrain.rewards.pool import RewardPool, SampleError


class BoundedReward:
    """``fn`` called as a reward, every sample it cannot decide quickly run in a worker under ``timeout_s``.

    Args:
        name: the reward's name in errors and logs.
        fn: the reward; it travels to the workers pickled (a registry reward or a ``module:function``).
        timeout_s: time limit of the reward on one sample.
        num_workers: worker processes, started on first need.
        load_timeout_s: time limit for a worker to load the reward (imports).
    """

    def __init__(
        self, name: str, fn: RewardFn, *, timeout_s: float = 10.0, num_workers: int = 1, load_timeout_s: float = 120.0
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"BoundedReward {name!r}: timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"BoundedReward {name!r}: num_workers must be >= 1, got {num_workers}")
        self.name = name
        self.fn = fn
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.load_timeout_s = float(load_timeout_s)
        self._lock = threading.Lock()
        self._pool: RewardPool | None = None
        self._pool_pid: int | None = None

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]] | None = None
    ) -> tuple[list[float | None], list[SampleError]]:
        """Every sample's value (``None`` where the reward timed out, failed or could not judge) and the errors."""
        columns = dict(columns or {})
        n = len(completions)
        quick = getattr(self.fn, "quick_scores", None)
        decided: dict[int, float | None] = quick(list(prompts), list(completions), **columns) if callable(quick) else {}
        rest = [i for i in range(n) if i not in decided]
        values: list[float | None] = [decided.get(i) for i in range(n)]
        if not rest:
            return values, []
        pooled, errors = self._get_pool().run(
            {self.name: self.fn},
            [prompts[i] for i in rest],
            [completions[i] for i in rest],
            {column: [column_values[i] for i in rest] for column, column_values in columns.items()},
        )
        for j, i in enumerate(rest):
            values[i] = pooled[self.name][j]
        return values, [SampleError(rest[e.sample], e.reward, e.kind, e.message) for e in errors]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        """The reward's own signature; a sample that timed out or failed is ``None`` (see :meth:`score`)."""
        return self.score(prompts, completions, columns)[0]

    def close(self) -> None:
        """Stop the workers this process started (a later call starts new ones)."""
        with self._lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.close()
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get_pool(self) -> RewardPool:
        with self._lock:
            if self._pool is not None and self._pool_pid != os.getpid():
                self._pool = None  # the forking parent's pool: its workers are the parent's to use and stop
            if self._pool is None:
                self._pool = RewardPool(
                    num_workers=self.num_workers, timeout_s=self.timeout_s, load_timeout_s=self.load_timeout_s
                )
                self._pool_pid = os.getpid()
            return self._pool
