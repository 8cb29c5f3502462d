"""The statistics of an evaluation: pass@k, accuracy with its 95% interval, and paired tests between two models.

- pass@k with the unbiased estimator: for an item with ``n`` samples of which ``c`` are correct,
  pass@k = 1 - C(n - c, k) / C(n, k), the chance that at least one of ``k`` samples drawn without replacement from
  the ``n`` is correct (Chen et al., 2021); computed exactly on integers (``math.comb``), then averaged over items,
  with the standard error of the mean of the per-item estimates (``pass_at_k``, ``summarize``).
- Outcome accuracy: the mean of the scored outcomes, a sample no reward could score left out (``outcome_accuracy``).
- 95% intervals for an accuracy over items (``wilson_interval``, ``accuracy_interval``) and one-sided paired tests
  that model A beats model B on the same items (``sign_test_p``, ``permutation_test_p``).

This module only counts; it never generates or scores.
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
    """The mean of the scored outcomes (``None``: no reward could score the sample, left out); NaN when none is
    scored. A plain left-to-right ``sum`` divided by the count, the arithmetic of GRPO's accuracy metrics."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else math.nan


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for ``k`` successes in ``n`` trials (``z`` = 1.96: 95%), clipped to [0, 1]."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"Wilson interval: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(per_item: Sequence[float]) -> tuple[float, float]:
    """A 95% interval for the mean of ``per_item`` outcomes: Wilson's when every outcome is 0 or 1, else the normal
    interval mean ± 1.96 standard errors over the per-item success rates (sample variance, n - 1 in the
    denominator, n when there is one item), clipped to [0, 1]."""
    if not per_item:
        raise ValueError("accuracy interval of no items")
    n, mean = len(per_item), sum(per_item) / len(per_item)
    if all(h in (0.0, 1.0) for h in per_item):
        return wilson_interval(round(sum(per_item)), n)
    half = 1.96 * math.sqrt(sum((h - mean) ** 2 for h in per_item) / max(n - 1, 1) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def sign_test_p(better: Sequence[float], worse: Sequence[float]) -> float:
    """Exact one-sided sign test over paired items (McNemar's on 0/1 outcomes; with per-item success rates, the
    items where the two differ): P(at least this many wins | no difference), ties left out; 1 when all tie."""
    wins = sum(b > w for b, w in zip(better, worse, strict=True))
    losses = sum(w > b for b, w in zip(better, worse, strict=True))
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def permutation_test_p(better: Sequence[float], worse: Sequence[float], resamples: int = 20_000,
                       seed: int = 0) -> float:
    """One-sided paired sign-flip permutation test on per-item differences (their sum is the statistic, so unlike the
    sign test it weighs how much each item moved): P(a sum at least this large | each difference's sign is a coin
    flip). Monte Carlo over ``resamples`` flips drawn from a torch generator seeded with ``seed``, counting the
    observed one, so never 0."""
    import torch

    d = torch.tensor([b - w for b, w in zip(better, worse, strict=True)], dtype=torch.float64)
    observed = d.sum().item()
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (resamples, len(d)), generator=generator, dtype=torch.float64) * 2 - 1
    at_least = int((signs @ d >= observed - 1e-9).sum().item())
    return (at_least + 1) / (resamples + 1)
