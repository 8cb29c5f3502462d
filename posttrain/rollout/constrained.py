"""Grammar-constrained decoding with xgrammar: a completion that must be JSON (any object, or one valid against a
JSON schema: ``response_format``, and the forced tool calls of ``tool_choice``, which are JSON schemas too).

A request builds one :class:`ConstraintFactory` (``json_schema_constraint`` / ``json_object_constraint``), compiled
once over the tokenizer's vocabulary (:func:`grammar_compiler`), and puts it in ``SamplingParams.constraint``. The
in-process engines' shared decode step (``posttrain.rollout.base.LogitsProcessors``) asks it for one matcher per
row (:meth:`ConstraintFactory.rows`), masks each step's logits to the tokens the grammar allows and advances the
matchers. The grammar allows the request's stop tokens only where the JSON is complete: a row that took one
finishes with "stop", its completion the JSON text followed by that stop token.

Whitespace between JSON tokens is not allowed by default (``any_whitespace=False``, vLLM's
``disable_any_whitespace``): a weak model may otherwise spend its whole budget on newlines inside a valid prefix.
Known limit: xgrammar reads UTF-8 leniently, taking an encoded UTF-16 surrogate (bytes ED A0-BF xx) for a character
inside a JSON string; byte-level tokens can spell one, and decoding then replaces it. A schema's ``pattern`` or
``enum`` keeps a string to known characters. xgrammar's compilers are cached per tokenizer and vocabulary size
(and each caches its compiled grammars), so a repeated schema costs nothing. This module never samples: it only says which tokens may come next.
"""

from __future__ import annotations

import json
import re
import threading
import weakref

import torch
import xgrammar as xgr

_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {vocab size: compiler}
_lock = threading.Lock()  # the server builds constraints from several request threads
_CONTROL = re.compile(rb"[\x00-\x09\x0b\x0c\x0e-\x1f]")  # the control bytes but \n and \r


def grammar_compiler(tokenizer, vocab_size: int) -> xgr.GrammarCompiler:
    """xgrammar's compiler over ``tokenizer``'s vocabulary padded to the model's ``vocab_size``, made once per pair."""
    with _lock:
        per_size = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            if vocab_size < len(tokenizer):
                raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            # Two kinds of token are made empty, which xgrammar never allows (the stop tokens keep their own
            # handling): added special tokens (chat markup, <tool_call>), which xgrammar reads as their text, so a
            # JSON string could hold one, and decoding, which skips them, would change the text the grammar
            # checked; and tokens holding a control byte other than \n and \r, which xgrammar's JSON strings
            # accept raw although JSON requires them escaped (json.loads refuses them)
            special = set(tokenizer.all_special_ids) - set(info.stop_token_ids)
            vocab = [b"" if i in special or _CONTROL.search(text) else text
                     for i, text in enumerate(info.decoded_vocab)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=info.stop_token_ids)
            per_size[vocab_size] = xgr.GrammarCompiler(info)
        return per_size[vocab_size]


def json_schema_constraint(tokenizer, schema: dict | str, vocab_size: int, *,
                           any_whitespace: bool = False) -> ConstraintFactory:
    """Completions that are JSON valid against ``schema`` (a dict or its JSON text); a schema xgrammar cannot
    compile is a ValueError naming it."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        compiled = grammar_compiler(tokenizer, vocab_size).compile_json_schema(text, any_whitespace=any_whitespace)
    except (RuntimeError, ValueError, xgr.InvalidJSONError) as e:
        raise ValueError(f"json schema: xgrammar cannot compile it: {e}") from None
    return ConstraintFactory(compiled, vocab_size, text, any_whitespace)


def json_object_constraint(tokenizer, vocab_size: int, *, any_whitespace: bool = False) -> ConstraintFactory:
    """Completions that are one JSON object, of any content (``response_format: json_object``; vLLM compiles the
    same schema)."""
    return json_schema_constraint(tokenizer, {"type": "object"}, vocab_size, any_whitespace=any_whitespace)


class ConstraintFactory:
    """A compiled grammar for one request: :meth:`rows` makes the matchers of a wave's rows. ``schema`` (the JSON
    schema's text) and ``any_whitespace`` are kept for engines that compile it themselves (vLLM)."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, schema: str, any_whitespace: bool):
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.schema = schema
        self.any_whitespace = any_whitespace

    def rows(self, count: int, stop_token_ids: list[int]) -> ConstrainedRows:
        """Matchers for ``count`` rows that end on ``stop_token_ids`` (empty: the tokenizer's EOS)."""
        return ConstrainedRows(self, count, stop_token_ids)


class ConstrainedRows:
    """One grammar matcher per batch row, and the bitmask they fill each step."""

    def __init__(self, factory: ConstraintFactory, count: int, stop_token_ids: list[int]):
        stops = list(stop_token_ids) or None
        self.vocab_size = factory.vocab_size
        self.matchers = [xgr.GrammarMatcher(factory.compiled, override_stop_tokens=stops) for _ in range(count)]
        self.bitmask = xgr.allocate_token_bitmask(count, factory.vocab_size)  # int32 on the CPU, as xgrammar fills it

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits of the tokens each row's grammar does not allow next to -inf, in place (float32)."""
        rows = len(self.matchers)
        for i, matcher in enumerate(self.matchers):
            matcher.fill_next_token_bitmask(self.bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[:rows].to(logits.device), vocab_size=self.vocab_size)

    def advance(self, tokens: list[int]) -> list[int]:
        """Feed each row its sampled token; returns the rows whose grammar is now complete (they took a stop token)."""
        complete = []
        for i, (matcher, token) in enumerate(zip(self.matchers, tokens, strict=True)):
            if not matcher.accept_token(token):  # the mask allowed it: a refusal is a bug, not a sampling outcome
                raise RuntimeError(f"the grammar refused token {token} that its own mask allowed (row {i})")
            if matcher.is_terminated():
                complete.append(i)
        return complete

    def select(self, keep: list[int]) -> None:
        """Keep the rows ``keep``, in this order."""
        self.matchers = [self.matchers[i] for i in keep]
