"""An example reward plugin for posttrain: minus the fraction of repeated word n-grams in a completion.

Installed with ``pip install examples/reward_plugin``, it is found by name (``posttrain.rewards.get("repetition")``,
or ``name: repetition`` in a recipe's rewards) through its entry point in group ``posttrain.rewards``.
It follows TRL's reward signature and imports nothing from posttrain, so it also works as a TRL reward.
It never scores an empty or too-short completion: those get ``None`` (does not apply), not 0.
"""

from __future__ import annotations

from typing import Any


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    assistant = [m for m in completion if m.get("role") == "assistant"]
    return str(assistant[-1].get("content") or "") if assistant else ""


def repetition_reward(prompts: list[Any], completions: list[Any], *, n: int = 3, **columns: Any) -> list[float | None]:
    """0.0 for a completion with no repeated word ``n``-gram, down to nearly -1.0 for one phrase on a loop."""
    scores: list[float | None] = []
    for completion in completions:
        words = _text(completion).split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            scores.append(None)
            continue
        scores.append(-(1.0 - len(set(grams)) / len(grams)))
    return scores
