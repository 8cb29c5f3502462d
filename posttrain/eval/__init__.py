"""Evaluation of checkpoints on GSM8K, HumanEval and BFCL from local files: pass@k on any rollout engine.

``posttrain eval`` is :mod:`posttrain.eval.cli`; the pieces: tasks (items, prompts, rewards, gold completions),
completions (items to texts on a ``posttrain.rollout`` engine), the runner (generate, score through ``posttrain.rewards``, count),
metrics (pass@k, outcome accuracy, accuracy intervals, paired tests between two models).
Nothing here trains or downloads.
"""

from posttrain.eval.completions import CompletionSource, EngineCompletions, EvalSampling
from posttrain.eval.metrics import (
    accuracy_interval,
    outcome_accuracy,
    pass_at_k,
    permutation_test_p,
    sign_test_p,
    summarize,
    wilson_interval,
)
from posttrain.eval.runner import EvalConfig, TaskResult, eval_rewards, evaluate, score_completions
from posttrain.eval.tasks import TASKS, DataError, EvalItem, resolve_tasks

__all__ = [
    "TASKS",
    "CompletionSource",
    "DataError",
    "EngineCompletions",
    "EvalConfig",
    "EvalItem",
    "EvalSampling",
    "TaskResult",
    "accuracy_interval",
    "eval_rewards",
    "evaluate",
    "outcome_accuracy",
    "pass_at_k",
    "permutation_test_p",
    "resolve_tasks",
    "score_completions",
    "sign_test_p",
    "summarize",
    "wilson_interval",
]
