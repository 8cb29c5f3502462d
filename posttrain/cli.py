"""The ``posttrain`` command line: one subcommand per stage of the pipeline.

Each subcommand lives in the module that implements it; this file names them and holds what the recipe-driven ones
share (``run_recipe``, ``--print-config``). A module listed here provides ``add_arguments(parser)`` and
``run(args) -> int`` (``args.command``: the subcommand's name); one that sets ``ACCEPTS_OVERRIDES = True`` also gets
the unparsed ``--group.field VALUE`` arguments as ``args.overrides`` (see ``posttrain.config``). Imports are lazy so
``posttrain --help`` stays fast and a subcommand's heavy dependencies load only when it runs.

A recipe-driven command named in ``CONFIGS`` also gets, from its config class: ``--help`` listing every field with its
type, default and doc (``posttrain.config.describe_config``), and ``--print-config``, which prints the resolved recipe
(file plus overrides, checked) as YAML and exits. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "filter": ("posttrain.judges.cli", "rule filters, dedup and an LLM judge over a data set, with a manifest"),
    "demo": ("posttrain.demo", "run the end-to-end pipeline on a tiny model (CPU, no network)"),
    "tokenizer": ("posttrain.tokenizer", "build a byte-level BPE tokenizer with the Granite chat template"),
    "generate": ("posttrain.rollout.cli", "sample from a checkpoint on a rollout engine (native, transformers, vllm)"),
    "grpo": ("posttrain.grpo.cli", "on-policy GRPO with the DAPO loss on verifiable rewards"),
    "vllm-serve": ("posttrain.grpo.server", "rollout server for GRPO's server mode (vLLM, native or transformers), weights by broadcast"),
    "pretrain": ("posttrain.train.cli", "pre-train (or extend the context of) a model from a recipe, under accelerate"),
    "sft": ("posttrain.train.cli", "supervised fine-tuning (full or LoRA) from a recipe, under accelerate"),
    "pairs": ("posttrain.dpo.pairs_cli", "sample answers and turn a pairwise judge's or a reward's verdicts into preference pairs"),
    "dpo": ("posttrain.dpo.cli", "preference optimisation (DPO, IPO, SimPO; full or LoRA) from a recipe, under accelerate"),
    "export": ("posttrain.export", "write a signed HF-format instruct checkpoint with a sha256 manifest"),
    "verify": ("posttrain.verify", "check an exported checkpoint's hashes and signature"),
    "merge": ("posttrain.merge", "linear or SLERP merge of checkpoints of one architecture"),
    "serve": ("posttrain.serving.server", "OpenAI-compatible HTTP server for a checkpoint, on a streaming rollout engine"),
    "eval": ("posttrain.eval.cli", "pass@k on GSM8K, HumanEval and BFCL from local files"),
}

# name -> the config class its recipe is loaded into ("module:Class")
CONFIGS: dict[str, str] = {
    "grpo": "posttrain.grpo.config:GrpoConfig",
    "pretrain": "posttrain.train.config:TrainConfig",
    "sft": "posttrain.train.config:TrainConfig",
    "pairs": "posttrain.dpo.config:PairsConfig",
    "dpo": "posttrain.dpo.config:DpoConfig",
}


def config_class(name: str) -> type | None:
    """The config class of a recipe-driven command, or None."""
    if name not in CONFIGS:
        return None
    module, _, cls = CONFIGS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    from posttrain import __version__

    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help/usage or the unknown-command error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    config_cls = config_class(name)
    sub = argparse.ArgumentParser(prog=f"posttrain {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    if config_cls is not None:
        from posttrain.config import describe_config

        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved recipe (the file, then the overrides, checked) as YAML and exit")
        sub.epilog = ("config fields (set in the recipe, or override with --group.field VALUE):\n\n"
                      + describe_config(config_cls))
    if getattr(module, "ACCEPTS_OVERRIDES", False):  # config-driven commands: --group.field VALUE overrides
        args, overrides = sub.parse_known_args(rest)
        args.overrides = overrides
    else:
        args = sub.parse_args(rest)
    if config_cls is not None and args.print_config:  # the recipe as the command would run it, or its one-line error
        from posttrain.config import config_yaml

        return 2 if run_recipe(name, config_cls, args, lambda c: print(config_yaml(c), end="")) is None else 0
    args.command = name  # a module may serve several commands
    try:
        return int(module.run(args) or 0)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under ``accelerate launch`` the command's process group is left before the interpreter exits: gloo's
    threads, torn down at exit instead, can abort the process ('terminate called without an active exception')
    after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_recipe(name: str, config_cls: type, args: argparse.Namespace, work: Callable[[Any], Any],
               errors: tuple[type[Exception], ...] = ()) -> tuple[Any, Any] | None:
    """Load the recipe ``args.config`` (with ``args.overrides``) into ``config_cls`` and run ``work(config)``:
    ``(config, its result)``, or None after one line on stderr (the command's exit code 2) for a bad recipe, a
    missing file or one of ``errors``."""
    from posttrain.config import ConfigError, load_config

    try:
        config = load_config(config_cls, getattr(args, "config", None), getattr(args, "overrides", []))
        return config, work(config)
    except (ConfigError, FileNotFoundError, *errors) as e:
        print(f"posttrain {name}: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    raise SystemExit(main())
