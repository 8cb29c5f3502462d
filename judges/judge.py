"""LLM-as-judge: pointwise rubric scores and pairwise preferences judged in both orders.

Pointwise: the rubric gets the prompt and one response; the answer is parsed to a score and a short rationale.
Pairwise: the rubric gets two responses, and each pair is judged twice, once in each order; a response wins only
if it wins in both orders, anything else is a tie, so a judge that always prefers a position yields ties. An
answer that cannot be parsed is recorded as such; with ``on_unparseable: retry`` the request is sent again as a
new attempt (a distinct cache entry). This module builds prompts and reads verdicts; the backend and cache live in
``backends``/``cache``, and what to keep is decided by the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.judges.backends import JudgeClient, JudgeRequest, make_backend
from posttrain.judges.cache import JudgeCache
from posttrain.judges.config import JudgeConfig
from posttrain.judges.parsing import PairwiseVerdict, PointwiseVerdict, parse_pairwise, parse_pointwise
from posttrain.judges.rubrics import load_rubric, render


def render_turns(value: Any) -> str:
    """A prompt or response as the judge reads it: strings as they are, chat turns as ``role: content`` lines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    lines = []
    for turn in value:
        content = turn.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        for call in turn.get("tool_calls") or []:
            fn = call.get("function", call) if isinstance(call, dict) else {}
            args = fn.get("arguments")
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            content += f"\n[tool call] {fn.get('name')}({args})"
        lines.append(f"{turn.get('role', '?')}: {content}")
    return "\n".join(lines)


@dataclass
class PairwiseOutcome:
    """The combined result of judging (a, b) and (b, a)."""

    winner: str | None  # "a", "b", "tie", or None when either order stayed unparseable
    first_order: PairwiseVerdict  # a shown first
    second_order: PairwiseVerdict  # b shown first


class Judge:
    """One configured judge: rubric, backend, cache and parse policy."""

    def __init__(self, config: JudgeConfig, cache_path: str | Path, backend: Any = None) -> None:
        self.config = config
        self.rubric_source, self.rubric = load_rubric(config.rubric)
        self.backend = backend if backend is not None else make_backend(config.backend)
        self.cache = JudgeCache(cache_path)
        self.client = JudgeClient(self.backend, self.cache, config.sampling)

    @property
    def model(self) -> str:
        return self.backend.model

    def close(self) -> None:
        self.cache.close()

    def _attempts(self) -> int:
        return max(1, self.config.max_attempts) if self.config.on_unparseable == "retry" else 1

    def _run(self, contents: list[str], parse: Callable[[str], Any], ok: Callable[[Any], bool],
             progress: Callable[[int], None] | None) -> list[Any]:
        verdicts: list[Any] = [None] * len(contents)
        pending = list(range(len(contents)))
        for attempt in range(self._attempts()):
            if not pending:
                break
            requests = [JudgeRequest([{"role": "user", "content": contents[i]}], attempt) for i in pending]
            answers = self.client.answer(requests, progress if attempt == 0 else None)
            still = []
            for i, answer in zip(pending, answers):
                verdicts[i] = parse(answer)
                if not ok(verdicts[i]):
                    still.append(i)
            pending = still
        return verdicts

    def score(self, prompts: list[Any], responses: list[Any],
              progress: Callable[[int], None] | None = None) -> list[PointwiseVerdict]:
        """Pointwise verdicts, one per (prompt, response); score None where no attempt could be parsed."""
        c = self.config
        contents = [render(self.rubric, prompt=render_turns(p), response=render_turns(r))
                    for p, r in zip(prompts, responses)]
        return self._run(contents, lambda a: parse_pointwise(a, c.score_min, c.score_max),
                         lambda v: v.score is not None, progress)

    def compare(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any],
                progress: Callable[[int], None] | None = None) -> list[PairwiseOutcome]:
        """Each pair judged in both orders; a response wins only when both orders agree."""
        contents = []
        for p, a, b in zip(prompts, responses_a, responses_b):
            prompt = render_turns(p)
            contents.append(render(self.rubric, prompt=prompt, response_a=render_turns(a), response_b=render_turns(b)))
            contents.append(render(self.rubric, prompt=prompt, response_a=render_turns(b), response_b=render_turns(a)))
        verdicts = self._run(contents, parse_pairwise, lambda v: v.winner is not None, progress)
        return [combine_orders(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(prompts))]


def combine_orders(first: PairwiseVerdict, second: PairwiseVerdict) -> PairwiseOutcome:
    """``first`` showed (a, b), ``second`` showed (b, a). Agreement wins; disagreement or any tie is a tie."""
    if first.winner is None or second.winner is None:
        return PairwiseOutcome(None, first, second)
    vote_first = {"A": "a", "B": "b", "tie": "tie"}[first.winner]
    vote_second = {"A": "b", "B": "a", "tie": "tie"}[second.winner]
    winner = vote_first if vote_first == vote_second else "tie"
    return PairwiseOutcome(winner, first, second)


def normalised_score(verdict: PointwiseVerdict, config: JudgeConfig) -> float | None:
    """A pointwise score mapped to [0, 1]; None when unparseable."""
    if verdict.score is None:
        return None
    return (verdict.score - config.score_min) / (config.score_max - config.score_min)
