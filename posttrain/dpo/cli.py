"""``posttrain dpo``: load a recipe (with ``--group.field VALUE`` overrides), train on preference pairs.

Launch with ``accelerate launch --config_file recipes/accelerate/<x>.yaml -m posttrain.cli dpo --config
recipes/dpo_tiny.yaml`` for several processes. This module only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse

from posttrain.train.cli import ACCEPTS_OVERRIDES, add_arguments

__all__ = ["ACCEPTS_OVERRIDES", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from posttrain.dpo.config import DpoConfig
    from posttrain.dpo.run import run_dpo
    from posttrain.train.cli import run_training_recipe

    def held_out(result) -> str:
        accuracy = result.eval_metrics.get("eval/rewards/accuracy")
        return f", held-out reward accuracy {accuracy:.3f}" if accuracy is not None else ""

    return run_training_recipe("dpo", DpoConfig, args, lambda config: run_dpo(config, recipe=args.config), held_out)
