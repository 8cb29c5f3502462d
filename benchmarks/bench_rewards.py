"""Benchmark of the math reward and the reward pool on the real GSM8K test split, beside TRL's anchor.

Measures, each from the same run:
- math reward throughput in-process, ours vs TRL's ``trl.rewards.accuracy_reward`` (math-verify on every
  sample), on the 1319 GSM8K test solutions ending in ``\\boxed{answer}`` (so both can read them), and the
  accuracy each reports (both should be 1.0);
- through ``RewardPool``, 2 workers against 1 (parallel speed-up) and 2 workers against in-process scoring
  (the cost of isolation and per-sample time limits), on the same solutions ending in ``\boxed{\frac{2x}{2}}``
  so every sample goes through math-verify (the plain-number fast path would measure only the pipes).

Prints one JSON line per measure: name, ours, anchor, unit, ratio (how many times better ours is).
Run: ``python benchmarks/bench_rewards.py [--limit N]``. It never writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from posttrain.rewards import RewardPool, RewardSet, WeightedReward, get


def _shared_data() -> Path:
    path = Path(os.environ.get("POSTTRAIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (path / "gsm8k" / "test.jsonl").is_file():
        sys.exit(f"GSM8K not found under {path}: set POSTTRAIN_SHARED_DATA")
    return path


def _line(name: str, ours: float, anchor: float, unit: str, higher_is_better: bool) -> None:
    ratio = ours / anchor if higher_is_better else anchor / ours
    print(
        json.dumps(
            {"name": name, "ours": round(ours, 3), "anchor": round(anchor, 3), "unit": unit, "ratio": round(ratio, 3)}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1319, help="number of GSM8K test rows")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    rows = [json.loads(line) for line in (_shared_data() / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    rows = rows[: args.limit]
    golds = [row["answer"].rsplit("####", 1)[1].strip().replace(",", "") for row in rows]
    texts = [row["answer"].rsplit("####", 1)[0] + f"So the answer is $\\boxed{{{g}}}$." for row, g in zip(rows, golds)]
    chats = [[{"role": "assistant", "content": t}] for t in texts]
    prompts = [row["question"] for row in rows]
    n = len(rows)

    ours = get("math")
    ours(["q"], ["\\boxed{1}"], answer=["1"])  # import math-verify outside the timing, for both
    start = time.perf_counter()
    our_scores = ours(prompts, chats, answer=golds)
    our_rate = n / (time.perf_counter() - start)

    from trl.rewards import accuracy_reward

    start = time.perf_counter()
    trl_scores = accuracy_reward(chats, golds)
    trl_rate = n / (time.perf_counter() - start)
    _line("math_reward_gsm8k_samples_per_s_vs_trl_accuracy_reward", our_rate, trl_rate, "samples/s", True)
    _line(
        "math_reward_gsm8k_accuracy_vs_trl_accuracy_reward", sum(our_scores) / n, sum(trl_scores) / n, "fraction", True
    )

    sympy_texts = [
        row["answer"].rsplit("####", 1)[0] + f"$\\boxed{{\\frac{{{2 * int(g)}}}{{2}}}}$" for row, g in zip(rows, golds)
    ]
    start = time.perf_counter()
    in_process = ours(prompts, sympy_texts, answer=golds)
    in_process_rate = n / (time.perf_counter() - start)
    assert in_process == [1.0] * n
    rewards = RewardSet([WeightedReward("math", ours)])
    rates = {}
    for workers in (1, 2):
        with RewardPool(num_workers=workers, timeout_s=10.0) as pool:
            rewards.score(prompts[:workers], texts[:workers], pool=pool, answer=golds[:workers])  # load math-verify
            start = time.perf_counter()
            result = rewards.score(prompts, sympy_texts, pool=pool, answer=golds)
            rates[workers] = n / (time.perf_counter() - start)
            assert result.total == [1.0] * n, "the pool must give the in-process scores"
    _line("reward_pool_samples_per_s_2_workers_vs_1", rates[2], rates[1], "samples/s", True)
    _line("reward_pool_2_workers_vs_in_process_samples_per_s", rates[2], in_process_rate, "samples/s", True)


if __name__ == "__main__":
    main()
