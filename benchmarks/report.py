"""One JSON line per measure, the format every benchmark here prints.

``ratio`` is how many times better ours is: anchor/ours for times and memory (lower is better), ours/anchor for
throughputs (higher is better). Import it from a benchmark script run as ``python benchmarks/bench_x.py``.
"""

from __future__ import annotations

import json
import platform

import torch


def emit(name: str, ours: float, anchor: float, unit: str, higher_is_better: bool, **extra) -> dict:
    ratio = (ours / anchor) if higher_is_better else (anchor / ours)
    row = {"name": name, "ours": round(float(ours), 4), "anchor": round(float(anchor), 4), "unit": unit,
           "ratio": round(float(ratio), 3), **extra}
    print(json.dumps(row), flush=True)
    return row


def machine() -> str:
    return f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
