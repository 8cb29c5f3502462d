"""``posttrain filter``: rule filters, dedup and an LLM judge over a data set, with a manifest and a report.

Example: ``posttrain filter --config recipes/filter/sft_chat.yaml --input data.jsonl --output out/``. Options can
be overridden with ``--set judge.min_score=8`` (dotted keys; rules by id: ``--set rules.length.max_chars=4000``).
Errors in the config or the input are reported with file, line and field before any work starts; the command
only parses arguments and calls ``posttrain.judges.pipeline``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="filter config (YAML): rules, dedup, judge")
    parser.add_argument("--input", required=True, help="JSONL, Parquet, or a saved datasets folder")
    parser.add_argument("--output", required=True, help="folder for kept/rejected sets, manifest.json, report.png")
    parser.add_argument("--format", choices=["jsonl", "parquet", "datasets"], help="input format (default: detect)")
    parser.add_argument("--split", help="split to read from a saved DatasetDict")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. judge.backend.concurrency=4 (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes for the rules and dedup signatures (the output does not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from posttrain.judges.backends import JudgeBackendError
    from posttrain.judges.config import ConfigError, load_config
    from posttrain.judges.pipeline import run_filter
    from posttrain.judges.samples import SampleError
    from rich.console import Console

    console = Console(stderr=True)
    try:
        config = load_config(args.config, args.overrides)
        run_filter(config, args.input, args.output, fmt=args.format, split=args.split, config_source=args.config,
                   show_progress=not args.no_progress, console=console, workers=args.workers)
    except (ConfigError, SampleError, JudgeBackendError, FileNotFoundError) as exc:
        print(f"posttrain filter: error: {exc}", file=sys.stderr)
        return 2
    return 0
