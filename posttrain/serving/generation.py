"""Text in, text out on a rollout engine: prompts encoded, completions decoded, EOS and stop strings applied.

The server and ``posttrain eval`` both turn token completions into text through :class:`TextGenerator`, so a
completion reads the same wherever it is produced: the closing EOS (or stop token) is not part of the text,
the text ends before the first stop string (OpenAI semantics: the stop string itself is not returned), and a
completion cut by a stop string finishes with ``"stop"``. A stop string that is a single token also stops the
row inside the engine; a longer one is applied to the decoded text (the row may have run on past it).
This module never trains and never changes a model's weights.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.rollout import Completion, Engine, SamplingParams

GenerateFn = Callable[[list[list[int]], SamplingParams], list[Completion]]


@dataclass
class TextCompletion:
    """One decoded sample: ``prompt_index`` is the prompt's position in the call, samples of a prompt adjacent."""

    prompt_index: int
    text: str
    token_ids: list[int]  # the tokens behind ``text`` (no closing EOS/stop token, nothing past a stop string)
    num_generated: int  # tokens the engine generated for this sample (what usage counts)
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    # the tokens whose log-probs are reported (``token_ids`` and the closing stop token, as vLLM reports them), with
    # their log-probs and top alternatives ((token id, log-prob), best first), when the request asked for them
    logprob_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def load_checkpoint(folder: str | Path, engine: str | None = None, *, device: str = "auto", dtype: str = "auto",
                    field: str = "--engine", needs: Sequence[str] = (), max_num_seqs: int = 256,
                    seed: int = 0) -> tuple[Any, Engine]:
    """The tokenizer saved in ``folder`` and an engine on the model beside it: ``engine`` by name (None: the
    registry's default for the model's family), checked for the model's family and ``needs`` before the weights
    load (``EngineError`` naming ``field``); ``device``/``dtype`` ``"auto"``: CUDA if present, the checkpoint's
    dtype on GPU and float32 on CPU. Raises ``FileNotFoundError`` naming what is missing."""
    from posttrain.rollout.registry import build_engine, choose_engine
    from posttrain.tokenizer import load_tokenizer

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model checkpoint")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json): save the tokenizer into the checkpoint folder "
            "(tokenizer.save_pretrained(folder)) beside the weights"
        )
    spec = choose_engine(engine, path, field=field, needs=needs)
    tokenizer = load_tokenizer(path)
    return tokenizer, build_engine(spec.name, path, field=field, needs=needs, tokenizer=tokenizer, device=device,
                                   dtype=dtype, max_num_seqs=max_num_seqs, seed=seed)


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as a dict."""
    return json.loads((Path(folder) / "config.json").read_text())


class TextGenerator:
    """Encodes prompts, samples through ``generate`` (an engine's or a batch scheduler's ``generate``; ``None`` for a
    generator that only encodes and decodes) and decodes completions as the module docstring says."""

    def __init__(self, tokenizer: Any, generate: GenerateFn | None, vocab_size: int, max_context: int | None = None,
                 eos_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._generate = generate
        self.vocab_size = vocab_size
        self.max_context = max_context
        eos = list(eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer may refuse concurrent use ("Already borrowed")
        # the special tokens skip_special_tokens drops: the tokenizer's own and every added token marked special
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", [])) | frozenset(
            i for i, token in added.items() if getattr(token, "special", False))
        self._token_texts: dict[int, str] = {}

    @classmethod
    def for_model(cls, tokenizer: Any, config: Any, generate: GenerateFn | None) -> TextGenerator:
        """A generator for a model with ``config`` (its config object, or its ``config.json`` as a dict) sampling
        through ``generate`` (None: encode and decode only)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        eos = get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(tokenizer, generate, int(get("vocab_size")), get("max_position_embeddings"), eos_ids)

    # -- prompts ----------------------------------------------------------------------------------------------
    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, the tokenizer's own (e.g. BOS) are added as it says."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered by the tokenizer's chat template, by default ending with the assistant
        header; ``continue_final_message`` leaves the last (assistant) message open instead."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the checkpoint's tokenizer has no chat template; use plain-text completions")
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message,
                                                      **(template_kwargs or {}))
        return self.encode_text(text)

    def token_ids_of(self, texts: Sequence[str]) -> list[int]:
        """The ids of tokens given by their text (those the tokenizer has), e.g. the tool-call tags."""
        with self._tokenizer_lock:
            ids = [self.tokenizer.convert_tokens_to_ids(t) for t in texts]
        return [i for i in ids if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id]

    def chat_stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn besides EOS: the start of another role's header."""
        return self.token_ids_of(["<|start_of_role|>"])

    def single_token_ids(self, stop: Sequence[str]) -> list[int]:
        """Ids of the stop strings that are exactly one token (the engine stops those rows itself)."""
        ids = []
        for text in stop:
            encoded = self.encode_text(text)
            if len(encoded) == 1 and self.decode(encoded) == text:
                ids.append(encoded[0])
        return ids

    # -- sampling ---------------------------------------------------------------------------------------------
    def sampling_params(self, *, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), **fields: Any
                        ) -> SamplingParams:
        """The engine's parameters: ``fields`` are ``SamplingParams``' (max_new_tokens, temperature, n, seed,
        penalties, log-probs...); ``stop_token_ids`` and the ``stop`` strings of one token stop a row in the engine,
        as do the tokenizer's EOS tokens."""
        stops = sorted(set(stop_token_ids) | set(self.single_token_ids(stop)))
        return SamplingParams(stop_token_ids=stops, eos_token_id=list(self.eos_token_ids) or None, **fields)

    def complete(self, prompts: list[list[int]], params: SamplingParams, stop: Sequence[str] = ()
                 ) -> list[TextCompletion]:
        """``params.n`` decoded samples per prompt, prompt-major (prompt i's j-th sample at ``i * n + j``)."""
        if self._generate is None:
            raise RuntimeError("this TextGenerator was built without an engine: it only encodes and decodes")
        return [self.finish(c, params, stop) for c in self._generate(prompts, params)]

    def finish(self, completion: Completion, params: SamplingParams, stop: Sequence[str] = (),
               skip_special_tokens: bool = False, keep: Sequence[int] = ()) -> TextCompletion:
        """Decode one engine completion: drop the closing stop token, cut at the first stop string; with
        ``skip_special_tokens``, special tokens (but those in ``keep``) are not part of the text."""
        ids = list(completion.token_ids)
        reason = completion.finish_reason
        if len(ids) > params.max_new_tokens:  # generated in a batch with a larger limit
            ids, reason = ids[: params.max_new_tokens], "length"
        generated = len(ids)
        reported = list(ids)
        if reason == "stop" and ids and ids[-1] in params.stop_ids():
            ids = ids[:-1]
        skip = self.special_ids - set(keep) if skip_special_tokens else frozenset()
        text = self.decode(ids, skip)
        cut = _first_stop(text, stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
            ids = self._tokens_covering(ids, cut, skip)
            reported = list(ids)
        out = TextCompletion(completion.prompt_index, text, ids, generated, reason)
        top = getattr(completion, "top_logprobs", None)
        if top is not None:
            out.logprob_ids = reported
            out.logprobs = list(completion.reported_logprobs[:len(reported)])
            out.top_logprobs = list(top[:len(reported)])
        return out

    def decode(self, ids: Sequence[int], skip: frozenset[int] | set[int] = frozenset()) -> str:
        """The text of ``ids``, the tokens in ``skip`` left out."""
        ids = [i for i in ids if i not in skip] if skip else list(ids)
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """One token's text, as log-probs name it."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id])
        return text

    def _tokens_covering(self, ids: list[int], length: int, skip: frozenset[int] = frozenset()) -> list[int]:
        """The shortest prefix of ``ids`` whose text reaches ``length`` characters."""
        for end in range(len(ids) + 1):
            if len(self.decode(ids[:end], skip)) >= length:
                return ids[:end]
        return ids

    def text_stream(self, params: SamplingParams, stop: Sequence[str] = (), hold: Sequence[str] = (),
                    skip: frozenset[int] = frozenset()) -> TextStream:
        """An incremental decoder for one choice streamed with ``params`` (see :class:`TextStream`); tokens in
        ``skip`` are left out of the text."""
        return TextStream(self, params.stop_ids(), stop, hold, skip)


class TextStream:
    """One choice's text, decoded as its tokens arrive, by the rules of :meth:`TextGenerator.finish`.

    ``push`` takes each new token and returns the text that is now certain: never half of a multi-byte character,
    never text that could still turn out to begin a stop string (it is held back until the next tokens decide),
    nothing from a stop string on, and no closing stop token. ``hold`` names more markers held back the same
    way, and where one appears whole the stream stops sending (a tool call: the whole message decides how it is
    sent). Whitespace is held back until something else follows it when ``hold`` is given (an assistant message
    that is only a tool call has no content). ``rest(final)`` returns what is left of the final text."""

    def __init__(self, generator: TextGenerator, stop_ids: Sequence[int], stop: Sequence[str] = (),
                 hold: Sequence[str] = (), skip: frozenset[int] = frozenset()):
        self.generator = generator
        self.skip = skip
        self.stop_ids = set(stop_ids)
        self.stop = [s for s in stop if s]
        self.hold = [h for h in hold if h]
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read], whole characters only
        self.prefix = self.read = 0  # decode ids[prefix:] and drop the text of ids[prefix:read]: O(1) per token
        self.sent = ""
        self.closed = False  # a stop string or a held marker appeared: nothing more is sent before the end
        self.reports: list[tuple] = []  # (token, log-prob, top) of tokens whose log-probs are not sent yet

    def push(self, token_id: int, finish_reason: str | None = None) -> str:
        if self.closed:
            return ""
        if not (finish_reason == "stop" and token_id in self.stop_ids) and token_id not in self.skip:
            self.ids.append(token_id)
        window = self.generator.decode(self.ids[self.prefix:])
        if finish_reason is None and window.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
            return ""
        self.text += window[len(self.generator.decode(self.ids[self.prefix:self.read])):]
        self.prefix, self.read = self.read, len(self.ids)
        text = self.text
        cut = _first_stop(text, self.stop)
        if cut is not None:
            text, self.closed = text[:cut], True
        marker = _first_stop(text, self.hold)
        if marker is not None:
            text, self.closed = text[:marker], True
        safe = len(text)
        if not self.closed and finish_reason is None:
            safe -= _partial_suffix(text, [*self.stop, *self.hold])
        if self.hold and not text[:safe].strip():
            safe = 0
        if safe <= len(self.sent):
            return ""
        delta = text[len(self.sent):safe]
        self.sent = text[:safe]
        return delta

    def rest(self, final_text: str) -> str:
        """What of ``final_text`` has not been sent (it always begins with what was)."""
        if not final_text.startswith(self.sent):  # would be a bug in push: say so rather than garble the text
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the final text {final_text!r}")
        return final_text[len(self.sent):]


def _partial_suffix(text: str, markers: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of one of ``markers``."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    positions = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(positions) if positions else None
