"""``posttrain sft``: supervised fine-tuning from a recipe (see ``posttrain.train.cli``)."""

from __future__ import annotations

import argparse

from posttrain.train.cli import ACCEPTS_OVERRIDES, add_arguments, run_task

__all__ = ["ACCEPTS_OVERRIDES", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    return run_task(args, "sft")
