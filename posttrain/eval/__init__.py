"""Evaluation of checkpoints on GSM8K, HumanEval and BFCL from local files: pass@k on any rollout engine.

``posttrain eval`` is :mod:`posttrain.eval.cli`; the pieces are ``tasks``, ``completions``, ``runner`` and
``metrics``. Nothing here trains or downloads.
"""

from posttrain.eval.completions import EngineCompletions, EvalSampling
from posttrain.eval.metrics import pass_at_k, summarize
from posttrain.eval.runner import EvalConfig, eval_rewards, evaluate, score_completions
from posttrain.eval.tasks import TASKS, DataError

__all__ = [
    "TASKS",
    "DataError",
    "EngineCompletions",
    "EvalConfig",
    "EvalSampling",
    "eval_rewards",
    "evaluate",
    "pass_at_k",
    "score_completions",
    "summarize",
]
