"""Reading a verdict out of a judge's free-form answer: JSON first, then a few textual patterns.

An answer that yields no verdict is reported as unparseable (``None``) with the answer kept for the record, never
turned into a default score. This module only parses text; it never talks to a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_KEYS = ("score", "rating", "grade")
_RATIONALE_KEYS = ("rationale", "reason", "reasoning", "explanation", "justification")
_WINNER_KEYS = ("winner", "preference", "preferred", "choice", "better")

_SCORE_PATTERNS = [
    re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]"),  # Rating: [[7]]
    re.compile(r"\b(?:score|rating|grade)\b\s*(?:is|of|=|:)?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*10\b"),  # 7/10
]
_WINNER_PATTERNS = [
    re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE),
    re.compile(r"\b(?:winner|preference|choice|better response)\b\s*(?:is|=|:)?\s*\**\s*\"?(A|B|tie)\b", re.IGNORECASE),
    re.compile(r"\bresponse\s+(A|B)\s+is\s+better\b", re.IGNORECASE),
]


@dataclass
class PointwiseVerdict:
    score: float | None  # None: unparseable
    rationale: str
    raw: str


@dataclass
class PairwiseVerdict:
    winner: str | None  # "A", "B", "tie", or None when unparseable
    rationale: str
    raw: str


def _json_objects(text: str) -> list[dict[str, Any]]:
    objects = []
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    for candidate in [stripped, *_JSON_OBJECT.findall(text)]:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


def parse_pointwise(text: str, score_min: float, score_max: float) -> PointwiseVerdict:
    """A score within [score_min, score_max] and a rationale; score None when none can be read."""
    for obj in _json_objects(text):
        score = _first(obj, _SCORE_KEYS)
        if isinstance(score, str):
            try:
                score = float(score.strip())
            except ValueError:
                score = None
        if isinstance(score, (int, float)) and not isinstance(score, bool) and score_min <= score <= score_max:
            rationale = _first(obj, _RATIONALE_KEYS)
            return PointwiseVerdict(float(score), str(rationale or ""), text)
    for pattern in _SCORE_PATTERNS:
        for match in pattern.finditer(text):
            score = float(match.group(1))
            if score_min <= score <= score_max:
                return PointwiseVerdict(score, text.strip()[:500], text)
    return PointwiseVerdict(None, "", text)


def _winner(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip().strip('"').lower()
    value = value.removeprefix("response ").strip()
    return {"a": "A", "b": "B", "tie": "tie", "equal": "tie", "none": "tie"}.get(value)


def parse_pairwise(text: str) -> PairwiseVerdict:
    """Which of two responses (A, shown first; B, shown second) won, or a tie; None when none can be read."""
    for obj in _json_objects(text):
        winner = _winner(_first(obj, _WINNER_KEYS))
        if winner is not None:
            return PairwiseVerdict(winner, str(_first(obj, _RATIONALE_KEYS) or ""), text)
    for pattern in _WINNER_PATTERNS:
        match = pattern.search(text)
        if match:
            return PairwiseVerdict(_winner(match.group(1)), text.strip()[:500], text)
    return PairwiseVerdict(None, "", text)
