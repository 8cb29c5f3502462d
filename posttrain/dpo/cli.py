"""``posttrain dpo``: load a recipe (with ``--group.field VALUE`` overrides), train on preference pairs.

Launch with ``accelerate launch --config_file recipes/accelerate/<x>.yaml -m posttrain.cli dpo --config
recipes/dpo_tiny.yaml`` for several processes. This module only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse
import sys

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the recipe (YAML); override any field with --group.field V")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import ConfigError, load_config
    from posttrain.dpo.config import DpoConfig
    from posttrain.dpo.run import run_dpo
    from posttrain.models.hybrid import CheckpointError as WeightsError  # weights not matching config.json
    from posttrain.train.checkpointing import CheckpointError
    from posttrain.train.data import DataError
    from posttrain.train.loop import TrainingError

    try:
        config = load_config(DpoConfig, args.config, getattr(args, "overrides", []))
        result = run_dpo(config, recipe=args.config)
    except (ConfigError, DataError, TrainingError, CheckpointError, WeightsError,
            FileNotFoundError) as e:
        print(f"posttrain dpo: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    held_out = result.eval_metrics.get("eval/rewards/accuracy")
    print(f"posttrain dpo: {result.steps} steps, last loss {result.final_loss:.4f}"
          + (f", held-out reward accuracy {held_out:.3f}" if held_out is not None else "")
          + f"; model in {config.checkpoint.output_dir}/final")
    return 0
