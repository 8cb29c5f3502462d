"""Benchmark of the sandboxed ``code`` reward on the real HumanEval: parallel speed-up and the cost of isolation.

Measures, from the same run, on the 164 ``prompt + canonical_solution`` programs (each must pass, or the run
stops before printing a figure):
- ``code_reward`` with 2 workers against 1 worker (solutions per second): the parallel speed-up;
- ``code_reward`` (2 workers) against a plain unsandboxed harness (2 workers): one ``python -I`` subprocess per
  candidate, same interpreter, pass = exit status 0; no namespaces, no uid switch, no rlimits, no token. The
  ratio (< 1) is the throughput kept under isolation;
- the same against the ``unshare`` backend, when util-linux ``unshare`` works here, to compare the two
  isolating backends.

With ``--anchor-checkout DIR`` (another checkout of this repository, e.g. a ``git worktree`` of an earlier
commit), also ``code_reward`` with 2 workers of that checkout against this one's, each measured in a fresh
process of its own, interleaved, best of ``--repeats``: the throughput kept across a change of the sandbox.

Prints one JSON line per measure: name, ours, anchor, unit, ratio (ours/anchor for throughputs).
Run: ``python benchmarks/bench_code_reward.py [--limit N] [--repeats R] [--anchor-checkout DIR]``. It writes
no files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
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


def load_checkout(root: Path) -> None:
    """Make ``posttrain`` and ``posttrain.rewards`` this process's imports of the checkout at ``root``."""
    import importlib.util

    for name, folder in (("posttrain", root / "posttrain"), ("posttrain.rewards", root / "rewards")):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            raise SystemExit(f"{folder} is not a posttrain checkout's package folder")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def checkout_throughput(root: Path, limit: int | None) -> float:
    """Solutions/s of ``code_reward`` (2 workers) from the checkout at ``root``, in a fresh process."""
    args = [sys.executable, __file__, "--measure-checkout", str(root)] + (["--limit", str(limit)] if limit else [])
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {root} failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def measure_checkout(root: Path, limit: int | None) -> None:
    """In a child process: print the checkout's solutions/s (its sandbox probed before the clock starts)."""
    load_checkout(root)
    from posttrain.rewards import code as checkout_code
    from posttrain.rewards import sandbox as checkout_sandbox

    rows = load_humaneval(limit)
    _ = checkout_sandbox.default_sandbox(checkout_sandbox.SandboxLimits(), "auto").info
    checkout_code.code_reward(
        [rows[0]["prompt"]],
        [rows[0]["canonical_solution"]],
        test=[rows[0]["test"]],
        entry_point=[rows[0]["entry_point"]],
    )
    start = time.perf_counter()
    rewards = checkout_code.code_reward(
        [r["prompt"] for r in rows],
        [r["canonical_solution"] for r in rows],
        test=[r["test"] for r in rows],
        entry_point=[r["entry_point"] for r in rows],
        workers=2,
    )
    elapsed = time.perf_counter() - start
    if rewards != [1.0] * len(rows):
        raise SystemExit(f"{root}: some canonical solutions failed: {rewards}")
    print(len(rows) / elapsed)


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
    parser.add_argument("--anchor-checkout", type=Path, help="another checkout to compare code_reward with")
    parser.add_argument("--measure-checkout", type=Path, help=argparse.SUPPRESS)  # the child's side of the above
    args = parser.parse_args()
    if args.measure_checkout is not None:
        measure_checkout(args.measure_checkout, args.limit)
        return
    rows = load_humaneval(args.limit)
    if args.anchor_checkout is not None:
        figures: dict[str, float] = {}
        for _ in range(args.repeats):
            for key, root in (("anchor", args.anchor_checkout.resolve()), ("ours", REPO)):
                figures[key] = max(figures.get(key, 0.0), checkout_throughput(root, args.limit))
        emit(
            "code_reward_humaneval_2_workers_vs_checkout",
            figures["ours"],
            figures["anchor"],
            n=len(rows),
            cpus=os.cpu_count(),
            anchor_checkout=str(args.anchor_checkout),
            load_average=[round(x, 2) for x in os.getloadavg()],
        )
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
