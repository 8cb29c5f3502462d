"""``posttrain grpo``: GRPO/DAPO training from a recipe, with ``--group.field VALUE`` overrides.

Run under ``accelerate launch`` for several processes. This module only parses arguments, checks the inputs the
recipe names (one line and exit code 2 for a missing model, tokenizer, data file or tracker package, or an engine
that cannot run the model or lacks what the run needs) and starts the trainer; it never holds training logic. A
reward that fails past ``rewards.max_error_fraction`` ends the run with exit code 1 and the reward's name and
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (recipes/grpo*.yaml); overrides follow as --group.field VALUE")


def check_inputs(config) -> None:
    """The files the recipe names exist, before a model is built: ``FileNotFoundError`` naming the field and path."""
    if not config.model.path:
        raise FileNotFoundError("model.path: no checkpoint given")
    model = Path(config.model.path)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"model.path: no checkpoint at {model} (no config.json there)")
    for field, path in (("data.path", config.data.path), ("eval.path", config.eval.path)):
        if field == "data.path" and not path:
            raise FileNotFoundError("data.path: no prompts given")
        if path and not path.startswith("hf:") and not Path(path).exists():  # hf:NAME: a hub data set
            raise FileNotFoundError(f"{field}: no such file or folder: {path}")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import ConfigError, load_config
    from posttrain.grpo.config import GrpoConfig
    from posttrain.grpo.data import PromptDataError
    from posttrain.grpo.trainer import GrpoTrainer
    from posttrain.rewards import RewardError, RewardFailedError
    from posttrain.rollout import EngineError
    from posttrain.train.chassis import TrainingError, check_trackers
    from posttrain.train.checkpointing import CheckpointError

    # posttrain's own INFO lines; other libraries' (accelerate's per-step notes) only from WARNING up
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("posttrain").setLevel(logging.INFO)
    try:
        config = load_config(GrpoConfig, args.config, getattr(args, "overrides", []))
        check_trackers(config.logging.report_to)
        check_inputs(config)
        trainer = GrpoTrainer(config, recipe=args.config)
    except (ConfigError, TrainingError, PromptDataError, RewardError, CheckpointError, EngineError,
            FileNotFoundError) as e:
        print(f"posttrain grpo: {e}", file=sys.stderr)
        return 2
    try:
        history = trainer.train()
    except RewardFailedError as e:
        print(f"posttrain grpo: {e}", file=sys.stderr)
        return 1
    if history and trainer.accelerator.is_main_process:
        last = history[-1]
        print(f"posttrain grpo: {len(history)} steps on the {trainer.engine.name} engine, "
              f"accuracy {last.get('accuracy', float('nan')):.3f}, checkpoint in {config.checkpoint.output_dir}")
    return 0
