"""The math reward: extract the final answer from a completion and check it against the gold answer.

Extraction, in order of trust: the last ``\\boxed{...}`` (nested braces kept), the last ``#### x`` line (GSM8K),
the last "The answer is x", then, if enabled, the last number in the text. Equivalence: when both sides are
plain numbers (after stripping ``$``, ``\\$``, thousands separators, ``x =``, units) they are compared
numerically with a tolerance, with no sympy at all; otherwise through math-verify (``parse`` then
``verify(gold, prediction)``: gold first, its ``verify`` is not symmetric), numbers again with the tolerance.

Scores: 1.0 equivalent, 0.0 not (or no answer found), ``None`` when the gold answer cannot be parsed.
math-verify's own timeouts are ``signal.alarm`` based and break off the main thread, so they are switched off
here (``parsing_timeout=None``, ``timeout_seconds=None``): the reward pool's per-sample process time limit is
what bounds a pathological input (``(10!)!``, a huge binomial or sum, a symbolic determinant), and callers outside
the pool reach it through ``posttrain.rewards.bounded``, which scores here only what ``quick_scores`` decides
without sympy. Expressions whose value would have more than ``max_digits`` digits (a tower
like ``9^{9^{9^9}}``) are never evaluated. This module must never call math-verify with a timeout, nor
install signal handlers.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from posttrain.rewards.base import NamedReward, RewardConfigError, completion_text


class _DroppedTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is deliberate (the pool kills stuck workers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DroppedTimeoutWarning())

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_PLAIN_NUMBER = re.compile(rf"^(?:{_NUMBER})$")
_LAST_NUMBER = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?[ \t]*([^\n]*)")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_ASSIGNMENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\s*=\s*")
_TEXT_UNITS = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}")
_TRAILING_WORDS = re.compile(r"(?:\s+[A-Za-z]{2,}\.?)+$")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_ATTEMPTS = 64  # unclosed boxes tried from the end: bounds the work on adversarial text
_MAX_BOX_CHARS = 20_000  # a box argument longer than this is treated as unclosed


@dataclass(frozen=True)
class MathReward(NamedReward):
    """Scores completions against the gold answers in column ``answer_column`` (see the module docstring).

    Options (``get("math", ...)``):
        answer_column: dataset column holding the gold answer (a bare answer or a solution ending in ``#### x``).
        last_number_fallback: when no boxed / ``####`` / "answer is" candidate exists, use the last number.
        rel_tol, abs_tol: numeric tolerance (``math.isclose``) when both sides are numbers, not both integers
            (two integers must be equal).
        max_answer_chars: an extracted answer longer than this scores 0 without being parsed.
        max_digits: an expression whose value would have more digits than this is never evaluated (``None``:
            no guard; then only the pool's time limit bounds a huge power).
    """

    reward_name: ClassVar[str] = "math"

    answer_column: str = "answer"
    last_number_fallback: bool = True
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    max_answer_chars: int = 1000
    max_digits: int | None = 10_000

    def __post_init__(self) -> None:
        if self.rel_tol < 0 or self.abs_tol < 0:
            raise ValueError(f"math reward: rel_tol and abs_tol must be >= 0, got {self.rel_tol}, {self.abs_tol}")
        if self.max_answer_chars < 1 or (self.max_digits is not None and self.max_digits < 1):
            raise ValueError("math reward: max_answer_chars and max_digits must be >= 1")

    def warmup(self) -> None:
        """Import math-verify (sympy, about a second) before the first sample's time limit starts."""
        _parse("1")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        if self.answer_column not in columns:
            raise RewardConfigError(
                f"math reward needs the gold answers in column {self.answer_column!r}; "
                f"the batch has columns {sorted(columns)}"
            )
        answers = columns[self.answer_column]
        return [self.score(completion_text(c), a) for c, a in zip(completions, answers, strict=True)]

    def quick_scores(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> dict[int, float | None]:
        """The scores this reward gives without sympy, by sample index: in time linear in the texts' length
        (extraction, plain numbers). The samples left out need math-verify, whose time has no bound; a caller
        outside the reward pool sends those to it (``posttrain.rewards.bounded``)."""
        if self.answer_column not in columns:
            raise RewardConfigError(
                f"math reward needs the gold answers in column {self.answer_column!r}; "
                f"the batch has columns {sorted(columns)}"
            )
        out: dict[int, float | None] = {}
        for i, (c, a) in enumerate(zip(completions, columns[self.answer_column], strict=True)):
            decided = self._score_without_sympy(completion_text(c), a)
            if not isinstance(decided, tuple):
                out[i] = decided
        return out

    def score(self, completion: str, gold: Any) -> float | None:
        """1.0 / 0.0 for one completion against one gold answer; ``None`` if the gold answer is unusable."""
        decided = self._score_without_sympy(completion, gold)
        if not isinstance(decided, tuple):
            return decided
        gold_answer, predicted = decided
        gold_parsed = _parse(gold_answer)
        if not gold_parsed:
            return None
        predicted_parsed = _parse(predicted)
        if not predicted_parsed:
            return 0.0
        return float(self._equivalent(gold_parsed, predicted_parsed))

    def _score_without_sympy(self, completion: str, gold: Any) -> float | None | tuple[str, str]:
        """The score when no parsing is needed, else the (gold, predicted) answer texts that math-verify must compare."""
        gold_answer = gold_answer_text(gold)
        if gold_answer is None:
            return None
        predicted = extract_answer(completion, last_number_fallback=self.last_number_fallback)
        if predicted is None or len(predicted) > self.max_answer_chars:
            return 0.0
        gold_number, predicted_number = plain_number(gold_answer), plain_number(predicted)
        if gold_number is not None and predicted_number is not None:
            return float(self._close(gold_number, predicted_number))
        return gold_answer, predicted

    def _equivalent(self, gold: list[Any], predicted: list[Any]) -> bool:
        from math_verify import verify

        gold_expr, predicted_expr = gold[0], predicted[0]
        if self.max_digits is not None and (
            _too_large(gold_expr, self.max_digits) or _too_large(predicted_expr, self.max_digits)
        ):
            return str(gold[-1]).strip() == str(predicted[-1]).strip()
        gold_value, predicted_value = _numeric_value(gold_expr), _numeric_value(predicted_expr)
        if gold_value is not None and predicted_value is not None:
            return self._close(gold_value, predicted_value)
        return bool(verify(gold, predicted, timeout_seconds=None))

    def _close(self, gold: float, predicted: float) -> bool:
        """Integers compare exactly (1450000 is not 1450001); other numbers within the tolerance."""
        if gold.is_integer() and predicted.is_integer():
            return gold == predicted
        return math.isclose(gold, predicted, rel_tol=self.rel_tol, abs_tol=self.abs_tol)


def gold_answer_text(gold: Any) -> str | None:
    """The answer part of a gold column value: after the last ``####``, inside the last box, or the whole."""
    if gold is None:
        return None
    if isinstance(gold, bool):
        return None
    text = str(gold).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    else:
        boxed = last_boxed(text)
        if boxed is not None:
            text = boxed
    return text or None


def extract_answer(text: str, *, last_number_fallback: bool = True) -> str | None:
    """The final answer a completion gives, or ``None``; see the module docstring for the order of candidates."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (_HASHES, _ANSWER_IS):
        candidate = _last_group(pattern, text)
        if candidate is not None:
            end = _SENTENCE_END.search(candidate)
            candidate = (candidate[: end.start()] if end else candidate).strip().strip("$ ").rstrip(".")
            if candidate:
                return candidate
    if last_number_fallback:
        last = None
        for last in _LAST_NUMBER.finditer(text):
            pass
        if last is not None:
            return last.group(0)
    return None


def _last_group(pattern: re.Pattern[str], text: str) -> str | None:
    found = None
    for found in pattern.finditer(text):
        pass
    return found.group(1) if found is not None else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    end = len(text)
    for _ in range(_MAX_BOX_ATTEMPTS):
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        content = _braced_argument(text, start + len(cmd))
        if content is not None:
            return content
        end = start
    return None


def _braced_argument(text: str, pos: int) -> str | None:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":  # ``\boxed 5``: the argument runs to the next space or dollar
        token = re.match(r"[^\s$]+", text[pos:])
        return token.group(0) if token else None
    depth = 0
    for i in range(pos, min(len(text), pos + _MAX_BOX_CHARS)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
    return None


def plain_number(text: str) -> float | None:
    """``text`` as a float when it is just a number (``$``, ``\\$``, ``1,000``, ``x = 5``, ``50%``, units allowed)."""
    s = text.strip().strip("$").strip()
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "").replace("\\!", "").replace("{,}", ",")
    s = s.replace("\\,", ",") if re.search(r"\d\\,\d{3}", s) else s
    s = _TEXT_UNITS.sub("", s)
    s = _ASSIGNMENT.sub("", s).strip().strip("$").strip()
    s = _TRAILING_WORDS.sub("", s).rstrip(".").strip()
    if not _PLAIN_NUMBER.match(s):
        return None
    return float(s.replace(",", ""))


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> tuple[Any, ...]:
    from math_verify import parse

    latex = text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"
    return tuple(parse(latex, fallback_mode="no_fallback", parsing_timeout=None))


def _parse(text: str) -> list[Any]:
    return list(_parse_cached(text))


def _numeric_value(expr: Any) -> float | None:
    """A finite float for a sympy number with no free symbols, else ``None`` (sets, equations, symbols...)."""
    try:
        import sympy

        if isinstance(expr, sympy.Eq) and isinstance(expr.lhs, sympy.Symbol):
            expr = expr.rhs
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.free_symbols:
            value = complex(expr.evalf())
            if value.imag == 0 and math.isfinite(value.real):
                return value.real
    except (TypeError, ValueError, AttributeError, ArithmeticError):
        return None
    return None


def _too_large(expr: Any, max_digits: int) -> bool:
    """Whether evaluating ``expr`` could produce a number with more than ``max_digits`` digits."""
    try:
        import sympy
    except ImportError:  # pragma: no cover - math-verify depends on sympy
        return False
    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and _log10_magnitude(node) > max_digits:
            return True
        if isinstance(node, sympy.factorial) and _log10_magnitude(node.args[0]) > 4:
            return True
    return False


def _log10_magnitude(node: Any) -> float:
    """A rough upper bound of log10(|node|) for numeric nodes; 0 for anything that is not a plain number."""
    import sympy

    if isinstance(node, sympy.Integer):
        return max(abs(int(node)).bit_length() * 0.30103, 0.0)
    if isinstance(node, sympy.Rational):
        return max(_log10_magnitude(sympy.Integer(node.p)), _log10_magnitude(sympy.Integer(node.q)))
    if isinstance(node, sympy.Float):
        value = abs(float(node))
        return math.log10(value) if value > 1 else 0.0
    if isinstance(node, sympy.Pow):
        base_mag = _log10_magnitude(node.base)
        exp_mag = _log10_magnitude(node.exp)
        if exp_mag > 15:
            return math.inf
        return max(base_mag, 0.30103) * 10**exp_mag
    if isinstance(node, sympy.Mul | sympy.Add):
        return sum(_log10_magnitude(arg) for arg in node.args) + 1
    return 0.0
