"""The ``llm_judge`` reward: a pointwise judge score in [0, 1] for the RL loop, with TRL's reward signature.

Registered in the ``posttrain.rewards`` entry-point group (pyproject), so ``posttrain.rewards`` finds it without
importing ``posttrain.judges``. ``make_llm_judge_reward(config)`` builds one from a ``JudgeConfig``; the registered
``llm_judge_reward`` reads its judge config from the YAML file named by ``$POSTTRAIN_LLM_JUDGE_CONFIG`` (a file
with a ``judge:`` section, as in ``posttrain filter``), built on first call. A sample the judge's answer cannot be
scored for gets ``None`` (skipped in weighted sums), never 0. The reward only scores; it never filters data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.judges.config import ConfigError, JudgeConfig, load_config
from posttrain.judges.judge import Judge, normalised_score

RewardFn = Callable[..., list[float | None]]


def make_llm_judge_reward(config: JudgeConfig, cache_path: str | Path | None = None, backend: Any = None) -> RewardFn:
    """A TRL-signature reward ``fn(prompts, completions, **columns)`` backed by one judge and its cache."""
    cache = cache_path or config.cache or Path.home() / ".cache" / "posttrain" / "llm_judge.sqlite"
    judge = Judge(config, cache, backend=backend)

    def llm_judge(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        verdicts = judge.score(list(prompts), list(completions))
        return [normalised_score(v, config) for v in verdicts]

    llm_judge.judge = judge  # type: ignore[attr-defined]
    return llm_judge


_configured: RewardFn | None = None


def llm_judge_reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
    """The registered ``llm_judge`` reward; configure it with ``$POSTTRAIN_LLM_JUDGE_CONFIG``."""
    global _configured
    if _configured is None:
        path = os.environ.get("POSTTRAIN_LLM_JUDGE_CONFIG")
        if not path:
            raise ConfigError("the llm_judge reward needs $POSTTRAIN_LLM_JUDGE_CONFIG: a YAML file with a judge: section")
        config = load_config(path).judge
        if not config.backend.model:
            raise ConfigError(f"{path}: judge.backend.model is required for the llm_judge reward")
        _configured = make_llm_judge_reward(config)
    return _configured(prompts, completions, **columns)
