"""``posttrain pairs``: sample answers, judge them pairwise (both orders) or score them, write preference rows.

``posttrain pairs --config recipes/pairs_x.yaml --verdict.source reward [--pairing on_policy]``. This module only
parses arguments and reports errors; the work is ``posttrain.dpo.pairs.run_pairs``.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="the recipe (YAML); override any field with --group.field V")


def run(args: argparse.Namespace) -> int:
    from posttrain.cli import run_recipe
    from posttrain.dpo.config import PairsConfig
    from posttrain.dpo.pairs import run_pairs
    from posttrain.judges.backends import JudgeBackendError
    from posttrain.rewards import RewardError
    from posttrain.rollout import EngineError
    from posttrain.train.data import DataError

    done = run_recipe("pairs", PairsConfig, args, run_pairs, (JudgeBackendError, DataError, RewardError, EngineError))
    if done is None:
        return 2
    _, report = done
    print(f"posttrain pairs: {report.pairs} pairs from {report.answers} answers to {report.prompts} prompts "
          f"in {report.output}")
    if report.on_policy:
        c = report.on_policy
        print(f"posttrain pairs: greedy answers refuted on {c['greedy_refuted']} prompts, verified on "
              f"{c['greedy_verified']}; chosen answers sampled {c['chosen_from_sample']}, from the reference "
              f"{c['chosen_from_reference']}; {c['refuted_without_pair']} refuted prompts without a pair")
    return 0
