"""Several rewards with weights: scoring a batch, combining with ``None`` skipped, and what to log.

``RewardSet`` holds ``(name, reward, weight)`` entries. ``score`` runs them (in a :class:`RewardPool` when one
is given, else in this process) and returns a :class:`RewardResult`: each reward's raw values, the weighted
sum per sample over the rewards that could score it, the indices no reward could score (``None``: the GRPO
loop gives them advantage 0 and reports them, never a silent 0), the per-sample errors, and ``metrics()``
(mean/std per reward) for the trackers. ``RewardSpec``/``RewardsConfig`` are the config-file form.

Rewards are called by keyword, as TRL calls them (``prompts``, ``completions``, ``completion_ids``,
``trainer_state``, ``log_metric``, ``log_extra`` and the data columns). What they log with ``log_metric`` and
``log_extra`` is kept in the result (``logged_metrics``, ``logged_extra``), from worker processes too, and passed on
to the caller's own functions when given. ``RewardResult.raise_for_errors`` turns a batch's failures into
:class:`RewardFailedError` past ``rewards.max_error_fraction`` (default 0: any exception stops training, as in TRL).

In-process scoring has no time limit: it is for tests, evaluation and rewards that manage their own limits
(``in_process=True``). This module must never swallow a configuration error (unknown name, bad options,
wrong number of values, ``RewardConfigError`` from a reward): those raise.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from posttrain.rewards.base import (
    RewardConfigError,
    RewardCountError,
    RewardError,
    RewardFn,
    call_reward,
    reward_name,
    score_sample,
)
from posttrain.rewards.pool import RewardPool, SampleError

logger = logging.getLogger(__name__)


@dataclass
class RewardSpec:
    """One reward in a config: ``{name: math, weight: 1.0, options: {last_number_fallback: false}}``.

    name: a built-in name, a ``module:function`` path or a plugin's entry-point name (see ``get``).
    weight: its weight in the sum (may be negative; 0 keeps it for logging only).
    options: keyword options of the reward (the fields of a built-in's dataclass).
    label: the name it is logged under (default: ``name``); must be unique within a set.
    in_process: run it in the trainer's process, without the pool's time limit (for rewards that bound
        their own time, such as the sandboxed code reward, or that cannot be pickled).
    """

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    in_process: bool = False


@dataclass
class RewardsConfig:
    """The ``rewards`` group of a training config: what to score with and how to run it.

    rewards: the weighted rewards.
    num_workers: reward worker processes (0: score in the trainer's process, no time limits).
    timeout_s: time limit of one reward on one sample; the worker is killed and replaced past it.
    max_error_fraction: the largest fraction of a batch's samples on which one reward may fail (raise, return a bad
        value, kill its worker) before training stops with that reward's name and traceback; 0 (TRL's behaviour):
        any failure stops it. A sample past its time limit scores None and never counts as a failure.
    """

    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math")])
    num_workers: int = 2
    timeout_s: float = 10.0
    max_error_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.rewards = [r if isinstance(r, RewardSpec) else RewardSpec(**r) for r in self.rewards]
        if not self.rewards:
            raise ValueError("rewards.rewards: at least one reward is needed")
        if self.num_workers < 0:
            raise ValueError(f"rewards.num_workers must be >= 0, got {self.num_workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"rewards.timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"rewards.max_error_fraction must be in [0, 1], got {self.max_error_fraction}")

    def build(self) -> tuple[RewardSet, RewardPool | None]:
        """The reward set and, when ``num_workers`` > 0, a started pool (the caller closes it)."""
        reward_set = RewardSet.from_specs(self.rewards)
        pool = RewardPool(num_workers=self.num_workers, timeout_s=self.timeout_s) if self.num_workers else None
        return reward_set, pool


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    in_process: bool = False


@dataclass
class RewardResult:
    """What scoring a batch gave.

    values: raw values per reward name (``None`` where it did not apply or failed).
    total: weighted sum per sample over the rewards that scored it; ``None`` where none did.
    errors: why a reward failed on a sample (exceptions, timeouts, dead workers, bad values).
    logged_metrics: every value the rewards gave ``log_metric``, by metric name.
    logged_extra: every list the rewards gave ``log_extra``, concatenated by column name.
    """

    weights: dict[str, float]
    values: dict[str, list[float | None]]
    total: list[float | None]
    errors: list[SampleError]
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)
    logged_extra: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def unscored(self) -> list[int]:
        """Samples that no reward could score (advantage 0 in GRPO, and reported)."""
        return [i for i, t in enumerate(self.total) if t is None]

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Mean/std (over scored samples) per reward and of the total, plus counts, for the trackers."""
        out: dict[str, float] = {}
        for name, values in {**self.values, "total": self.total}.items():
            scored = [v for v in values if v is not None]
            out[f"{prefix}{name}/mean"] = statistics.fmean(scored) if scored else math.nan
            out[f"{prefix}{name}/std"] = statistics.pstdev(scored) if len(scored) > 1 else (0.0 if scored else math.nan)
            out[f"{prefix}{name}/none_frac"] = 1.0 - len(scored) / len(values) if values else 0.0
        out[f"{prefix}unscored"] = float(len(self.unscored))
        out[f"{prefix}errors"] = float(len(self.errors))
        return out

    def raise_for_errors(self, max_fraction: float = 0.0) -> None:
        """Raise :class:`RewardFailedError` for the first reward that failed on more than ``max_fraction`` of the
        samples (a time-out is not a failure: the limit did its job); its message has the first failure's traceback.
        """
        n = len(self.total)
        for name in self.values:
            failed = [e for e in self.errors if e.reward == name and e.kind != "timeout"]
            samples = len({e.sample for e in failed})
            if failed and samples > max_fraction * n:
                raise RewardFailedError(name, samples, n, max_fraction, failed[0])


class RewardFailedError(RewardError):
    """A reward failed on more of a batch's samples than ``rewards.max_error_fraction`` allows."""

    def __init__(self, reward: str, failed: int, total: int, max_fraction: float, first: SampleError) -> None:
        super().__init__(
            f"reward {reward!r} failed on {failed} of {total} samples (rewards.max_error_fraction={max_fraction:g}); "
            f"on sample {first.sample}: {first.message.rstrip()}"
        )
        self.reward, self.failed, self.total, self.first = reward, failed, total, first


class RewardSet:
    """Weighted rewards scored together; see the module docstring."""

    def __init__(self, rewards: Sequence[WeightedReward]) -> None:
        if not rewards:
            raise ValueError("RewardSet needs at least one reward")
        names = [r.name for r in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"RewardSet: reward names must be unique, repeated: {duplicates} (set a label)")
        for r in rewards:
            if not math.isfinite(r.weight):
                raise ValueError(f"RewardSet: weight of {r.name!r} must be finite, got {r.weight}")
        self.rewards = list(rewards)

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec]) -> RewardSet:
        from posttrain.rewards.registry import get

        return cls([WeightedReward(s.label or s.name, get(s.name, **s.options), s.weight, s.in_process) for s in specs])

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        pool: RewardPool | None = None,
        *,
        trainer_state: Any = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list[Any]], None] | None = None,
        **columns: Any,
    ) -> RewardResult:
        """Score a batch; rewards not marked ``in_process`` go to ``pool`` when one is given.

        ``columns`` are the data columns (``completion_ids`` among them when there are token ids); ``trainer_state``
        goes to the rewards that ask for it; ``log_metric``/``log_extra`` also receive what the rewards log.
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"RewardSet.score: {len(prompts)} prompts for {n} completions")
        values: dict[str, list[float | None]] = {}
        errors: list[SampleError] = []
        logged_metrics: dict[str, list[float]] = {}
        logged_extra: dict[str, list[Any]] = {}
        lock = threading.Lock()  # the pool's replay runs in the helper thread below

        def record_metric(name: str, value: float) -> None:
            with lock:
                logged_metrics.setdefault(name, []).append(value)
            if log_metric is not None:
                log_metric(name, value)

        def record_extra(column: str, items: list[Any]) -> None:
            with lock:
                logged_extra.setdefault(column, []).extend(items)
            if log_extra is not None:
                log_extra(column, items)

        context = {"trainer_state": trainer_state, "log_metric": record_metric, "log_extra": record_extra}
        pooled = {r.name: r.fn for r in self.rewards if pool is not None and not r.in_process}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-reward-pool") as executor:
            # the pool's workers score while this thread runs the in-process rewards
            pending = (
                executor.submit(pool.run, pooled, prompts, completions, columns, **context)
                if pool is not None and pooled
                else None
            )
            for r in self.rewards:
                if r.name not in pooled:
                    values[r.name], batch_errors = score_in_process(
                        r.name, r.fn, prompts, completions, columns, **context
                    )
                    errors.extend(batch_errors)
            if pending is not None:
                pooled_values, pooled_errors = pending.result()
                values.update(pooled_values)
                errors.extend(pooled_errors)
        values = {r.name: values[r.name] for r in self.rewards}
        weights = {r.name: r.weight for r in self.rewards}
        total = combine_values(values, weights)
        errors.sort(key=lambda e: (e.sample, e.reward))
        return RewardResult(weights, values, total, errors, logged_metrics, logged_extra)


def combine(*rewards: RewardFn | str | tuple[RewardFn | str, float]) -> RewardSet:
    """A :class:`RewardSet` from rewards or names, each optionally paired with a weight (default 1.0).

    ``combine(("math", 1.0), ("format", 0.2))`` or ``combine(my_reward, (get("overlong", ...), 1.0))``.
    """
    from posttrain.rewards.registry import get

    entries = []
    for item in rewards:
        fn, weight = item if isinstance(item, tuple) else (item, 1.0)
        name = fn if isinstance(fn, str) else reward_name(fn)
        entries.append(WeightedReward(name, get(fn) if isinstance(fn, str) else fn, float(weight)))
    return RewardSet(entries)


def combine_values(values: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float | None]:
    """Per sample, the weighted sum over rewards whose value is not ``None``; ``None`` if all are."""
    n = len(next(iter(values.values()))) if values else 0
    total: list[float | None] = []
    for i in range(n):
        scored = [(weights[name], vals[i]) for name, vals in values.items() if vals[i] is not None]
        total.append(math.fsum(w * v for w, v in scored) if scored else None)
    return total


def score_in_process(
    name: str,
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    **context: Any,
) -> tuple[list[float | None], list[SampleError]]:
    """Call ``fn`` on the whole batch; if it raises, call it per sample so one bad sample costs only itself.

    ``context``: the keywords besides the columns (``trainer_state``, ``log_metric``, ``log_extra``).
    """
    try:
        return call_reward(name, fn, prompts, completions, dict(columns), **context), []
    except (RewardCountError, RewardConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure: find the sample(s) responsible
        logger.info("reward %r raised on the batch (%s: %s); scoring sample by sample", name, type(exc).__name__, exc)
    values: list[float | None] = []
    errors: list[SampleError] = []
    for i in range(len(completions)):
        row = {column: column_values[i] for column, column_values in columns.items()}
        value, kind, detail = score_sample(name, fn, prompts[i], completions[i], row, **context)
        values.append(value)
        if kind is not None:  # a reward's failure costs its sample, not the batch
            errors.append(SampleError(i, name, kind, detail))
            if kind == "exception":
                logger.warning("reward %r on sample %d: %s", name, i, detail.splitlines()[0])
    return values, errors
