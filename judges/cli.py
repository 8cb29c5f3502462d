"""``posttrain filter``: rule filters, dedup and an LLM judge over a data set, with a manifest and a report.

Example: ``posttrain filter --config recipes/filter/sft_chat.yaml --input data.jsonl --output out/``. Options can
be overridden with ``--set judge.min_score=8`` (dotted keys; rules by id: ``--set rules.length.max_chars=4000``).
Errors in the config or the input are reported with file, line and field before any work starts; the command
only parses arguments and calls ``posttrain.judges.pipeline``.
"""

from __future__ import annotations

import argparse
import os
import sys


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count), at most 8."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="filter config (YAML): rules, dedup, judge")
    parser.add_argument("--input", required=True, help="JSONL, Parquet, or a saved datasets folder")
    parser.add_argument("--output", required=True, help="folder for kept/rejected sets, manifest.json, report.png")
    parser.add_argument("--format", choices=["jsonl", "parquet", "datasets"], help="input format (default: detect)")
    parser.add_argument("--split", help="split to read from a saved DatasetDict")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. judge.backend.concurrency=4 (repeatable)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for the rules and dedup signatures (default: the CPUs this process may use, "
                             "at most 8; the output does not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from posttrain.judges.backends import JudgeBackendError
    from posttrain.judges.config import ConfigError, load_config
    from posttrain.judges.pipeline import run_filter
    from posttrain.judges.samples import SampleError
    from rich.console import Console

    console = Console(stderr=True)
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        print(f"posttrain filter: error: --workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        run_filter(config, args.input, args.output, fmt=args.format, split=args.split, config_source=args.config,
                   show_progress=not args.no_progress, console=console, workers=workers)
    except (ConfigError, SampleError, JudgeBackendError, FileNotFoundError) as exc:
        print(f"posttrain filter: error: {exc}", file=sys.stderr)
        return 2
    return 0
