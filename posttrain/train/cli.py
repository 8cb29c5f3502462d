"""``posttrain sft`` and ``posttrain pretrain``: load a recipe (with ``--group.field VALUE`` overrides), train.

Both commands run the same ``run_training``, the command's name as its task; they differ in the rows they accept
(SFT: ``messages`` or ``prompt``/``completion``; pre-training: plain text) and pre-training alone runs staged
recipes. For several processes: ``accelerate launch --config_file recipes/accelerate/<x>.yaml -m posttrain.cli sft
--config recipes/sft_tiny.yaml``. This module only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the recipe (YAML); override any field with --group.field V")


def run_training_recipe(command: str, config_cls: type, args: argparse.Namespace, train: Callable[[Any], Any],
                        held_out: Callable[[Any], str] = lambda result: "") -> int:
    """``posttrain <command>``: load the recipe into ``config_cls`` and ``train(config)``; a bad recipe, data set or
    checkpoint, or a missing file, is one line on stderr and exit code 2. The main process then prints the steps, the
    last loss, ``held_out(result)`` and where the model is."""
    from posttrain.cli import run_recipe
    from posttrain.models.hybrid import CheckpointError as WeightsError  # weights not matching config.json
    from posttrain.train.checkpointing import CheckpointError
    from posttrain.train.data import DataError
    from posttrain.train.loop import TrainingError

    done = run_recipe(command, config_cls, args, train, (DataError, TrainingError, CheckpointError, WeightsError))
    if done is None:
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    config, result = done
    print(f"posttrain {command}: {result.steps} steps, last loss {result.final_loss:.4f}{held_out(result)}; "
          f"model in {config.checkpoint.output_dir}/final")
    return 0


def run(args: argparse.Namespace) -> int:
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import run_training

    return run_training_recipe(args.command, TrainConfig, args,
                               lambda config: run_training(config, args.command, recipe=args.config))
