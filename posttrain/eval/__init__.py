"""Evaluation of checkpoints on GSM8K, HumanEval and BFCL from local files: pass@k, native or vLLM engine.

``posttrain eval`` is :mod:`posttrain.eval.cli`; the pieces: tasks (items, prompts, rewards, gold completions),
engines (who generates), the runner (generate, score through ``posttrain.rewards``, count), metrics (pass@k).
Nothing here trains or downloads.
"""

from posttrain.eval.engines import EngineUnavailableError, EvalEngine, EvalSampling, NativeEvalEngine, VllmEvalEngine
from posttrain.eval.metrics import pass_at_k, summarize
from posttrain.eval.runner import EvalConfig, TaskResult, evaluate, score_completions
from posttrain.eval.tasks import TASKS, DataError, EvalItem, resolve_tasks

__all__ = [
    "TASKS",
    "DataError",
    "EngineUnavailableError",
    "EvalConfig",
    "EvalEngine",
    "EvalItem",
    "EvalSampling",
    "NativeEvalEngine",
    "TaskResult",
    "VllmEvalEngine",
    "evaluate",
    "pass_at_k",
    "resolve_tasks",
    "score_completions",
    "summarize",
]
