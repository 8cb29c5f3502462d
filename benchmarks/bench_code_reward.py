"""Benchmark of the sandboxed ``code`` reward on the real HumanEval: parallel speed-up and the cost of isolation.

Measures, from the same run, on the 164 ``prompt + canonical_solution`` programs (each must pass, or the run
stops before printing a figure):
- ``code_reward`` with 2 workers against 1 worker (solutions per second): the parallel speed-up;
- ``code_reward`` (2 workers) against a plain unsandboxed harness (2 workers): one ``python -I`` subprocess per
  candidate, same interpreter, pass = exit status 0; no namespaces, no uid switch, no rlimits, no token. The
  ratio (< 1) is the throughput kept under isolation;
- the same against the ``unshare`` backend, when util-linux ``unshare`` works here, to compare the two
  isolating backends.

Prints one JSON line per measure: name, ours, anchor, unit, ratio (ours/anchor for throughputs).
Run: ``python benchmarks/bench_code_reward.py [--limit N] [--repeats R]``. It writes no files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.rewards.code import code_reward
from posttrain.rewards.sandbox import Sandbox, SandboxError, SandboxLimits, default_sandbox

REPO = Path(__file__).resolve().parent.parent


def load_humaneval(limit: int | None) -> list[dict]:
    root = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SystemExit(f"HumanEval not found at {path}: set POSTTRAIN_SHARED_DATA")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def sandboxed(rows: list[dict], workers: int, backend: str) -> float:
    """Solutions per second through ``code_reward``; every canonical solution must score 1."""
    start = time.perf_counter()
    rewards = code_reward(
        [r["prompt"] for r in rows],
        [r["canonical_solution"] for r in rows],
        test=[r["test"] for r in rows],
        entry_point=[r["entry_point"] for r in rows],
        workers=workers,
        backend=backend,
    )
    elapsed = time.perf_counter() - start
    if rewards != [1.0] * len(rows):
        raise SystemExit(f"sandboxed run ({backend}, {workers} workers) failed some canonical solutions: {rewards}")
    return len(rows) / elapsed


def plain(rows: list[dict], workers: int, python: str) -> float:
    """Solutions per second with one bare ``python -I`` subprocess per candidate (no isolation at all)."""

    def run(row: dict) -> bool:
        program = f"{row['prompt']}{row['canonical_solution']}\n{row['test']}\ncheck({row['entry_point']})\n"
        proc = subprocess.run(
            [python, "-I", "-c", program], check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        return proc.returncode == 0

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(run, rows))
    elapsed = time.perf_counter() - start
    if not all(ok):
        raise SystemExit("the plain harness failed some canonical solutions")
    return len(rows) / elapsed


def emit(name: str, ours: float, anchor: float, **extra: object) -> None:
    print(
        json.dumps(
            {
                "name": name,
                "ours": round(ours, 2),
                "anchor": round(anchor, 2),
                "unit": "solutions/s",
                "ratio": round(ours / anchor, 3),
                **extra,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N HumanEval problems (default: all 164)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is kept")
    args = parser.parse_args()
    rows = load_humaneval(args.limit)
    sandbox = default_sandbox(SandboxLimits(), "auto")
    info = sandbox.info
    backends = [info.backend]
    if info.backend != "unshare":
        try:
            _ = Sandbox(backend="unshare").info
            backends.append("unshare")
        except SandboxError as exc:  # a missing fallback is reported, not fatal
            print(json.dumps({"note": f"unshare backend unavailable: {exc}"}))
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        runs = {
            "plain_2": lambda: plain(rows, 2, info.python),
            f"{info.backend}_1": lambda: sandboxed(rows, 1, "auto"),
            f"{info.backend}_2": lambda: sandboxed(rows, 2, "auto"),
        }
        if "unshare" in backends and info.backend != "unshare":
            runs["unshare_2"] = lambda: sandboxed(rows, 2, "unshare")
        for key, fn in runs.items():
            best[key] = max(best.get(key, 0.0), fn())
    common = {"n": len(rows), "cpus": os.cpu_count(), "backend": info.backend, "python": info.python}
    emit("code_reward_humaneval_2_workers_vs_1", best[f"{info.backend}_2"], best[f"{info.backend}_1"], **common)
    emit(
        "code_reward_humaneval_sandboxed_vs_plain_subprocess",
        best[f"{info.backend}_2"],
        best["plain_2"],
        workers=2,
        **common,
    )
    if "unshare_2" in best:
        emit(
            "code_reward_humaneval_unshare_vs_plain_subprocess",
            best["unshare_2"],
            best["plain_2"],
            workers=2,
            **dict(common, backend="unshare"),
        )


if __name__ == "__main__":
    main()
