"""Worker processes that run reward functions in parallel, one sample at a time, under a time limit.

Each reward is called on one sample at a time (``fn([prompt], [completion], **{col: [value]})``), in one of a
few persistent worker processes started with ``forkserver`` (``spawn`` where that is missing), so torch's
threads in the parent are never forked. A sample that outlives ``timeout_s`` has its worker killed (SIGKILL)
and replaced: threads cannot be killed and sympy stuck in C ignores signals, so this is the only limit that
always holds. Each worker leads its own process group, and the kill reaches the group, so processes a reward
started die with it. A reward that raises, times out, kills its worker or returns a bad value costs that sample:
its value is ``None`` and a :class:`SampleError` names the sample, the reward and what happened. A reward that
returns the wrong number of values, raises :class:`RewardConfigError` (a missing column, say) or cannot be
loaded in a worker, is a configuration error and raises.

Rewards travel to the workers pickled, once per worker. Lambdas, closures and functions defined in an
interactive ``__main__`` (``python -c``, a notebook) cannot be pickled by reference: ``run`` refuses them with
:class:`RewardNotPicklableError`, which says how to fix it (define the function in an importable module and
name it ``module:function``, or run it in-process through ``RewardSet``). Functions defined in a script file
work: as in any spawn/forkserver program, workers re-import the script (so its entry point must sit under
``if __name__ == "__main__":``). Rewards may define ``warmup()``;
a worker calls it when it loads the reward (heavy imports), outside any sample's time limit.

Rewards are called by keyword (see :func:`~posttrain.rewards.base.call_reward`); ``trainer_state`` travels to the
worker with each sample. ``log_metric`` and ``log_extra`` cannot cross a process boundary: a worker gives the reward
recording stand-ins, sends the calls back with the value, and ``run`` replays them into the caller's functions once
the batch is scored, reward by reward in sample order.

The pool never scores anything itself, never uses signals or threads as time limits, and never leaves a
worker behind: ``close()`` (or the context manager, or garbage collection, or interpreter exit) ends them.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, Self

from posttrain.rewards.base import (
    RewardConfigError,
    RewardCountError,
    RewardError,
    RewardFn,
    score_sample,
)

from posttrain.provenance import bytes_digest

logger = logging.getLogger(__name__)

ErrorKind = Literal["exception", "timeout", "worker_died", "invalid_value"]


@dataclass(frozen=True)
class SampleError:
    """Why one reward could not score one sample (its value is ``None``)."""

    sample: int
    reward: str
    kind: ErrorKind
    message: str


class RewardNotPicklableError(RewardError):
    """A reward cannot be sent to a worker process (a lambda, a closure, a function of an interactive session)."""


class RewardLoadError(RewardError):
    """A worker could not load (unpickle, import, warm up) a reward."""


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class RewardPool:
    """Persistent worker processes scoring (reward, sample) pairs with a per-sample time limit.

    Args:
        num_workers: worker processes (default: the CPUs this process may use, at most 8).
        timeout_s: time limit of one reward call on one sample; past it the worker is killed and replaced.
        start_method: ``forkserver`` or ``spawn`` (``fork`` is refused: unsafe with torch's threads).
        load_timeout_s: time limit for a worker to unpickle and warm up a reward (imports can be slow).

    Use it as a context manager, or call :meth:`close`. One ``run`` at a time (calls from several threads
    are serialised).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 10.0,
        start_method: str | None = None,
        load_timeout_s: float = 120.0,
    ) -> None:
        if num_workers is None:
            num_workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
        if num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0 or not load_timeout_s > 0:
            raise ValueError(f"RewardPool: timeout_s and load_timeout_s must be > 0, got {timeout_s}, {load_timeout_s}")
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if isinstance(main_file, str) and main_file.startswith("<"):  # `python - < script.py`
            raise RuntimeError(
                f"RewardPool: the main module was read from {main_file}, which worker processes cannot re-import "
                "(multiprocessing's spawn/forkserver need a file); save the script to a file and run that"
            )
        start_method = start_method or default_start_method()
        if start_method == "fork":
            raise ValueError("RewardPool: start_method 'fork' is unsafe with torch's threads; use forkserver or spawn")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.load_timeout_s = float(load_timeout_s)
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._task_ids = itertools.count()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers, os.getpid())
        self.workers_replaced = 0
        for _ in range(num_workers):
            self._workers.append(_Worker.start(self._ctx))

    # ------------------------------------------------------------------ public API

    def run(
        self,
        rewards: Mapping[str, RewardFn],
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: Mapping[str, Sequence[Any]] | None = None,
        *,
        trainer_state: Any = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list[Any]], None] | None = None,
    ) -> tuple[dict[str, list[float | None]], list[SampleError]]:
        """Score every sample with every reward; returns the values by reward name and the per-sample errors.

        ``trainer_state`` is given to the rewards that ask for it; their ``log_metric``/``log_extra`` calls are
        replayed into ``log_metric``/``log_extra`` when given (else dropped).
        """
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"RewardPool.run: {len(prompts)} prompts for {n} completions")
        for column, values in columns.items():
            if len(values) != n:
                raise ValueError(f"RewardPool.run: column {column!r} has {len(values)} values for {n} completions")
        payloads = {name: _payload(name, fn) for name, fn in rewards.items()}
        values: dict[str, list[float | None]] = {name: [None] * n for name in rewards}
        errors: list[SampleError] = []
        tasks = deque(_Task(next(self._task_ids), name, payloads[name][0], i) for i in range(n) for name in rewards)
        logged: dict[tuple[str, int], list[tuple[str, str, Any]]] = {}
        with self._lock:
            if self._finalizer.alive is False:
                raise RuntimeError("RewardPool.run on a closed pool")
            try:
                self._drive(tasks, payloads, prompts, completions, columns, values, errors, trainer_state, logged)
            except BaseException:
                self._reset_busy_workers()
                raise
        for name in rewards:  # the workers' log calls, in the order an in-process call would have made them
            for i in range(n):
                for kind, key, value in logged.get((name, i), []):
                    target = log_metric if kind == "metric" else log_extra
                    if target is not None:
                        target(key, value)
        errors.sort(key=lambda e: (e.sample, e.reward))
        return values, errors

    def pids(self) -> list[int]:
        """The workers' process ids (they change when a worker is replaced)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def close(self) -> None:
        """Stop every worker (politely, then by force); the pool cannot be used afterwards."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the scheduling loop

    def _drive(
        self,
        tasks: deque[_Task],
        payloads: dict[str, tuple[str, bytes]],
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: dict[str, Sequence[Any]],
        values: dict[str, list[float | None]],
        errors: list[SampleError],
        trainer_state: Any = None,
        logged: dict[tuple[str, int], list[tuple[str, str, Any]]] | None = None,
    ) -> None:
        key_names = {key: name for name, (key, _) in payloads.items()}
        key_payloads = dict(payloads.values())
        while tasks or any(w.state != "idle" for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.state != "idle" or not tasks:
                    continue
                task = tasks[0]
                if task.key not in worker.loaded:
                    message: tuple[Any, ...] = ("load", task.key, key_payloads[task.key])
                    state, limit = "loading", self.load_timeout_s
                else:
                    tasks.popleft()
                    i = task.sample
                    row = {column: column_values[i] for column, column_values in columns.items()}
                    message = (
                        "run",
                        task.task_id,
                        task.key,
                        task.reward,
                        prompts[i],
                        completions[i],
                        row,
                        trainer_state,
                    )
                    state, limit = "running", self.timeout_s
                try:
                    worker.conn.send(message)
                except (BrokenPipeError, EOFError, OSError):  # died while idle: replace it, keep the task
                    if state == "running":
                        tasks.appendleft(task)
                    self._replace(slot, reason="worker found dead while idle")
                    continue
                worker.state, worker.task = state, task
                worker.deadline = time.monotonic() + limit

            busy = [w for w in self._workers if w.state != "idle"]
            if not busy:
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s))

            for worker in busy:
                slot = self._workers.index(worker)
                task = worker.task
                assert task is not None
                if worker.conn in ready or worker.process.sentinel in ready:
                    try:
                        reply = worker.conn.recv() if worker.conn.poll() else None
                    except (EOFError, OSError):
                        reply = None
                    if reply is None:
                        worker.process.join(timeout=1.0)
                        code = worker.process.exitcode
                        if worker.state == "loading":
                            self._replace(slot, reason="died while loading")
                            raise RewardLoadError(
                                f"a worker died (exit code {code}) while loading reward {key_names[task.key]!r}"
                            )
                        self._record(errors, values, task, "worker_died", f"worker process died (exit code {code})")
                        self._replace(slot, reason=f"died with exit code {code}")
                        continue
                    if logged is not None and reply[0] == "result" and reply[-1]:
                        logged[(task.reward, task.sample)] = reply[-1]
                    self._handle_reply(worker, reply, key_names, values, errors)
                elif time.monotonic() >= worker.deadline:
                    if worker.state == "loading":
                        self._replace(slot, reason="load timeout")
                        raise RewardLoadError(
                            f"loading reward {key_names[task.key]!r} in a worker took over {self.load_timeout_s:g} s"
                        )
                    self._record(
                        errors,
                        values,
                        task,
                        "timeout",
                        f"exceeded the {self.timeout_s:g} s time limit; its worker was killed and replaced",
                    )
                    self._replace(slot, reason="timeout")

    def _handle_reply(
        self,
        worker: _Worker,
        reply: tuple[Any, ...],
        key_names: dict[str, str],
        values: dict[str, list[float | None]],
        errors: list[SampleError],
    ) -> None:
        task = worker.task
        assert task is not None
        if reply[0] == "loaded":
            _, key, failure = reply
            if failure is not None:
                worker.state, worker.task = "idle", None
                raise RewardLoadError(f"a worker could not load reward {key_names[key]!r}:\n{failure}")
            worker.loaded.add(key)
        elif reply[0] == "result":
            _, task_id, value, kind, detail, _logs = reply
            if task_id != task.task_id:  # cannot happen with one request in flight; never mis-attribute
                raise RuntimeError(f"reward worker answered task {task_id}, expected {task.task_id}")
            if kind == "count":
                worker.state, worker.task = "idle", None
                raise RewardCountError(task.reward, 1, detail)
            if kind == "config":
                worker.state, worker.task = "idle", None
                raise RewardConfigError(f"reward {task.reward!r}: {detail}")
            if kind is None:
                values[task.reward][task.sample] = value
            else:
                self._record(errors, values, task, kind, detail)
        else:
            raise RuntimeError(f"unexpected message from a reward worker: {reply[0]!r}")
        worker.state, worker.task = "idle", None

    @staticmethod
    def _record(
        errors: list[SampleError], values: dict[str, list[float | None]], task: _Task, kind: ErrorKind, message: str
    ) -> None:
        values[task.reward][task.sample] = None
        errors.append(SampleError(task.sample, task.reward, kind, message))
        logger.warning("reward %r on sample %d: %s: %s", task.reward, task.sample, kind, message.splitlines()[-1])

    def _replace(self, slot: int, reason: str) -> None:
        old = self._workers[slot]
        old.kill()
        self._workers[slot] = _Worker.start(self._ctx)
        self.workers_replaced += 1
        logger.info("reward worker %s replaced by %s (%s)", old.process.pid, self._workers[slot].process.pid, reason)

    def _reset_busy_workers(self) -> None:
        """After an error mid-run, workers still busy would answer into the next run: replace them."""
        for slot, worker in enumerate(self._workers):
            if worker.state != "idle" and self._finalizer.alive:
                self._replace(slot, reason="run aborted")


@dataclass
class _Task:
    task_id: int
    reward: str
    key: str
    sample: int


class _Worker:
    """The parent's handle on one worker process: its pipe, what it has loaded and what it is doing."""

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.loaded: set[str] = set()
        self.state: Literal["idle", "loading", "running"] = "idle"
        self.task: _Task | None = None
        self.deadline = 0.0

    @classmethod
    def start(cls, ctx: Any) -> _Worker:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_worker_main, args=(child_conn,), name="posttrain-reward-worker", daemon=False)
        process.start()
        child_conn.close()
        return cls(process, parent_conn)

    def stop(self, grace_s: float = 2.0) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, EOFError, OSError):
            pass
        self.process.join(timeout=grace_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it leads its own), so processes a reward started die too."""
        if self.process.is_alive() and self.process.pid is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, AttributeError):  # not (yet) a group leader; or no killpg
                self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()


def _stop_workers(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked copy of the pool: the workers belong to the process that started them
        return
    for worker in workers:
        if worker.state == "idle":
            worker.stop()
        else:
            worker.kill()
    workers.clear()


def _payload(name: str, fn: RewardFn) -> tuple[str, bytes]:
    """``(key, pickled reward)``; refuses what a worker could not load, with the fix in the message."""
    fix = (
        "define it at module level in an importable module and name it 'module:function' (or install it as a "
        "plugin), or run it in-process (RewardSet with in_process=True, no time limit)"
    )
    main = sys.modules.get("__main__")
    for obj in _reference_targets(fn):
        if getattr(obj, "__module__", None) == "__main__" and getattr(main, "__file__", None) is None:
            raise RewardNotPicklableError(
                f"reward {name!r} ({obj!r}) is defined in an interactive __main__ that worker processes cannot "
                f"import; {fix}"
            )
    try:
        data = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise RewardNotPicklableError(
            f"reward {name!r} ({fn!r}) cannot be sent to a worker process ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    return bytes_digest(data), data


def _reference_targets(fn: Any) -> list[Any]:
    targets = [fn, type(fn)]
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        targets.append(inner)
    return targets


def _worker_main(conn: Connection) -> None:
    """A worker: load rewards, run one (reward, sample) at a time, answer on the pipe, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us by message
    try:
        os.setsid()  # our own process group: a kill on timeout reaches whatever the reward started
    except OSError:
        pass
    rewards: dict[str, Any] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "load":
            _, key, data = message
            try:
                fn = pickle.loads(data)
                warmup = getattr(fn, "warmup", None)
                if callable(warmup):
                    warmup()
                rewards[key] = fn
                conn.send(("loaded", key, None))
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises RewardLoadError
                conn.send(("loaded", key, traceback.format_exc()))
            continue
        _, task_id, key, name, prompt, completion, row, trainer_state = message
        logs: list[tuple[str, str, Any]] = []  # the reward's log_metric/log_extra calls, replayed by the parent
        try:
            value, kind, detail = score_sample(
                name,
                rewards[key],
                prompt,
                completion,
                row,
                catch=BaseException,  # SystemExit too: a reward's failure costs its sample
                trainer_state=trainer_state,
                log_metric=lambda metric, number, record=logs.append: record(("metric", metric, number)),
                log_extra=lambda column, items, record=logs.append: record(("extra", column, list(items))),
            )
        except RewardCountError as exc:
            value, kind, detail = None, "count", exc.got
        except RewardConfigError as exc:
            value, kind, detail = None, "config", str(exc)
        conn.send(("result", task_id, value, kind, detail, logs if kind is None else []))
