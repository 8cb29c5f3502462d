"""``posttrain sft`` and ``posttrain pretrain``: load a recipe (with ``--group.field VALUE`` overrides), train.

Both commands run the same ``run_training``; they differ in the rows they accept (SFT: ``messages`` or
``prompt``/``completion``; pre-training: plain text) and pre-training alone runs staged recipes. Launch with
``accelerate launch --config_file recipes/accelerate/<x>.yaml -m posttrain.cli sft --config recipes/sft_tiny.yaml``
for several processes. This module only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse
import sys

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the recipe (YAML); override any field with --group.field V")


def run_task(args: argparse.Namespace, task: str) -> int:
    from posttrain.config import ConfigError, load_config
    from posttrain.models.hybrid import CheckpointError as WeightsError  # weights not matching config.json
    from posttrain.train.checkpointing import CheckpointError
    from posttrain.train.config import TrainConfig
    from posttrain.train.data import DataError
    from posttrain.train.loop import TrainingError
    from posttrain.train.run import run_training

    try:
        config = load_config(TrainConfig, args.config, getattr(args, "overrides", []))
        result = run_training(config, task, recipe=args.config)  # type: ignore[arg-type]
    except (ConfigError, DataError, TrainingError, CheckpointError, WeightsError,
            FileNotFoundError) as e:
        print(f"posttrain {task}: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(f"posttrain {task}: {result.steps} steps, last loss {result.final_loss:.4f}; "
          f"model in {config.checkpoint.output_dir}/final")
    return 0
