"""pass@k with the unbiased estimator, and its aggregation over the items of a task.

For an item with ``n`` samples of which ``c`` are correct, pass@k = 1 - C(n - c, k) / C(n, k): the chance that
at least one of ``k`` samples drawn without replacement from the ``n`` is correct (Chen et al., 2021). It is
computed exactly on integers (``math.comb``), then averaged over items; the standard error is that of the mean
of the per-item estimates. This module only counts; it never generates or scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one item with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n (samples per item), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """``pass@k`` and ``pass@k_stderr`` for each k, over items whose samples are marked correct or not."""
    if not correct:
        raise ValueError("pass@k of a task with no items")
    out: dict[str, float] = {}
    for k in ks:
        per_item = [pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct]
        mean = math.fsum(per_item) / len(per_item)
        var = math.fsum((x - mean) ** 2 for x in per_item) / (len(per_item) - 1) if len(per_item) > 1 else 0.0
        out[f"pass@{k}"] = mean
        out[f"pass@{k}_stderr"] = math.sqrt(var / len(per_item))
    return out


def outcome_accuracy(values: Sequence[float | None]) -> float:
    """The mean of the scored outcomes (None: not scored), NaN when none is scored."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else math.nan
