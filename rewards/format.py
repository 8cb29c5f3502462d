"""Shape rewards: ``format`` (tags, a regular expression, length bounds) and ``overlong`` (DAPO's soft
overlong punishment).

``format`` scores 1.0 when the completion passes every configured check (or, with ``partial``, the fraction
of checks passed). ``overlong`` is 0 for completions of at most ``max_len - cache_len`` tokens, falls linearly
to -1 at ``max_len`` tokens, and is -1 beyond: ``((max_len - cache_len) - L) / cache_len`` in between.
Lengths are in tokens: from the ``completion_ids`` column (TRL passes it to reward functions; so does
posttrain's GRPO loop), else from ``tokenizer`` (a local path or name loaded with ``local_files_only``, or a
tokenizer object). Neither module-level code nor a reward call here may download anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from posttrain.rewards.base import NamedReward, RewardConfigError, completion_text


@dataclass(frozen=True)
class FormatReward(NamedReward):
    """Checks the shape of a completion's text.

    Options (``get("format", ...)``):
        tags: each ``<tag>...</tag>`` must appear exactly once, closed, in this order (default: ``think``).
        regex: if set, the stripped completion must match it entirely (``re.DOTALL``).
        min_chars, max_chars: bounds on the stripped completion's length in characters (``None``: no bound).
        require_text_after_tags: something other than whitespace must follow the last tag (the answer).
        partial: score the fraction of checks passed instead of all-or-nothing.
    """

    reward_name: ClassVar[str] = "format"

    tags: tuple[str, ...] = ("think",)
    regex: str | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    require_text_after_tags: bool = True
    partial: bool = False
    _pattern: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))
        for tag in self.tags:
            if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
                raise ValueError(f"format reward: tag {tag!r} is not a valid tag name")
        if self.regex is not None:
            try:
                object.__setattr__(self, "_pattern", re.compile(self.regex, re.DOTALL))
            except re.error as exc:
                raise ValueError(f"format reward: regex {self.regex!r} does not compile: {exc}") from exc
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"format reward: min_chars {self.min_chars} > max_chars {self.max_chars}")
        if not self.tags and self.regex is None and self.min_chars is None and self.max_chars is None:
            raise ValueError("format reward: no check configured (give tags, regex, min_chars or max_chars)")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        return [self.score(completion_text(c)) for c in completions]

    def checks(self, text: str) -> dict[str, bool]:
        """Each configured check and whether ``text`` passes it."""
        stripped = text.strip()
        results: dict[str, bool] = {}
        if self.tags:
            results["tags"] = self._tags_ok(stripped)
        if self._pattern is not None:
            results["regex"] = self._pattern.fullmatch(stripped) is not None
        if self.min_chars is not None:
            results["min_chars"] = len(stripped) >= self.min_chars
        if self.max_chars is not None:
            results["max_chars"] = len(stripped) <= self.max_chars
        return results

    def score(self, text: str) -> float:
        results = self.checks(text)
        if self.partial:
            return sum(results.values()) / len(results)
        return float(all(results.values()))

    def _tags_ok(self, text: str) -> bool:
        position = 0
        for tag in self.tags:
            opening, closing = f"<{tag}>", f"</{tag}>"
            if text.count(opening) != 1 or text.count(closing) != 1:
                return False
            start = text.find(opening)
            end = text.find(closing)
            if start < position or end < start:
                return False
            position = end + len(closing)
        return not self.require_text_after_tags or bool(text[position:].strip())


@dataclass(frozen=True)
class OverlongReward(NamedReward):
    """DAPO's soft overlong punishment on token lengths (see the module docstring).

    Options (``get("overlong", max_len=..., cache_len=...)``):
        max_len: L_max, the generation limit in tokens.
        cache_len: L_cache, the width of the linear penalty band before ``max_len``.
        tokenizer: used only when the batch has no ``completion_ids`` column: a local path/name, or an object
            with ``encode(text, add_special_tokens=False)`` (a transformers tokenizer).
    """

    reward_name: ClassVar[str] = "overlong"

    max_len: int
    cache_len: int
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if not (isinstance(self.max_len, int) and isinstance(self.cache_len, int)):
            raise TypeError("overlong reward: max_len and cache_len are token counts (int)")
        if not 0 < self.cache_len <= self.max_len:
            raise ValueError(
                f"overlong reward: need 0 < cache_len <= max_len, got cache_len={self.cache_len}, max_len={self.max_len}"
            )

    def penalty(self, length: int) -> float:
        """0 up to ``max_len - cache_len`` tokens, linear to -1 at ``max_len``, -1 beyond."""
        start = self.max_len - self.cache_len
        if length <= start:
            return 0.0
        if length <= self.max_len:
            return (start - length) / self.cache_len
        return -1.0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        ids = columns.get("completion_ids")
        if ids is not None:
            lengths = [len(x) for x in ids]
        elif self.tokenizer is not None:
            lengths = [len(self._encode(completion_text(c))) for c in completions]
        else:
            raise RewardConfigError(
                "overlong reward measures tokens: give the batch a 'completion_ids' column or the reward a tokenizer "
                "(get('overlong', max_len=..., cache_len=..., tokenizer='path/to/tokenizer'))"
            )
        return [self.penalty(n) for n in lengths]

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    @cached_property
    def _tokenizer(self) -> Any:
        if not isinstance(self.tokenizer, str):
            return self.tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)
