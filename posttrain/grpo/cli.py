"""``posttrain grpo``: GRPO/DAPO training from a recipe, with ``--group.field VALUE`` overrides.

Run under ``accelerate launch`` for several processes. This module only parses arguments and starts the
trainer; it never holds training logic.
"""

from __future__ import annotations

import argparse
import logging

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (recipes/grpo*.yaml); overrides follow as --group.field VALUE")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import ConfigError, load_config
    from posttrain.grpo.config import GrpoConfig
    from posttrain.grpo.trainer import GrpoTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(GrpoConfig, args.config, getattr(args, "overrides", []))
    except ConfigError as e:
        raise SystemExit(f"posttrain grpo: {e}") from None
    trainer = GrpoTrainer(config)
    history = trainer.train()
    if history and trainer.accelerator.is_main_process:
        last = history[-1]
        print(f"posttrain grpo: {len(history)} steps, accuracy {last.get('accuracy', float('nan')):.3f}, "
              f"checkpoint in {config.run.output_dir}")
    return 0
