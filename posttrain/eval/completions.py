"""Completion texts for ``posttrain eval``: evaluation items rendered to prompts, sampled on a rollout engine
(``posttrain.rollout``: native, transformers or vLLM, chosen through its registry), decoded to texts.

A completion source turns evaluation items into ``n`` completion texts each. Every engine sees the same prompts,
rendered here by the checkpoint's tokenizer: the chat template (with BFCL's tools) in ``chat`` format, the plain
prompt with the task's stop strings in ``plain`` format; texts are decoded by ``TextGenerator``'s rules (a stop
string of one token stops the row in the engine, a longer one cuts the decoded text). Tests inject their own source
(anything with ``name``, ``prompt_format`` and ``generate``) to push chosen texts through the same scoring path.
This module never scores and never changes weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from posttrain.eval.tasks import EvalItem
from posttrain.rollout import Engine
from posttrain.sampling import SamplingSettings
from posttrain.serving.generation import TextGenerator

ProgressFn = Callable[[int], None]  # called with the number of items just finished


@dataclass
class EvalSampling(SamplingSettings):
    """How completions are sampled (``SamplingSettings``): greedy by default (temperature 0, n = 1), or n sampled
    per item."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    n: int = 1
    seed: int | None = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"n (samples per item) must be >= 1, got {self.n}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one completion per item; got n={self.n}: "
                             "set --temperature > 0 to sample several")


class CompletionSource(Protocol):
    name: str  # the engine's name, recorded in the results
    prompt_format: str

    def generate(self, items: list[EvalItem], sampling: EvalSampling,
                 progress: ProgressFn | None = None) -> list[list[str]]:
        """``sampling.n`` completion texts for each item, in the items' order."""
        ...


def resolve_prompt_format(tokenizer: Any, prompt_format: str) -> str:
    if prompt_format not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt format must be auto, chat or plain, got {prompt_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; this one has none")
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    return prompt_format


def render_prompt(generator: TextGenerator, item: EvalItem, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        return generator.encode_chat(item.messages, item.tools)
    return generator.encode_text(item.plain_prompt)


class EngineCompletions:
    """Completions from a rollout engine, ``batch_size`` items per ``generate`` call."""

    def __init__(self, engine: Engine, tokenizer: Any, model_config: Any, prompt_format: str = "auto",
                 batch_size: int = 32):
        """``model_config``: the model's config (object or ``config.json`` dict: vocabulary, context, EOS ids)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = engine.name
        self.generator = TextGenerator.for_model(tokenizer, model_config, engine.generate)
        self.prompt_format = resolve_prompt_format(tokenizer, prompt_format)
        self.batch_size = batch_size

    def generate(self, items: list[EvalItem], sampling: EvalSampling,
                 progress: ProgressFn | None = None) -> list[list[str]]:
        chat = self.prompt_format == "chat"
        out: list[list[str]] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            stop = [] if chat else sorted({s for item in batch for s in item.stop})
            params = self.generator.sampling_params(
                **sampling.sampling_fields(), n=sampling.n, stop=stop,
                seed=None if sampling.seed is None else sampling.seed + zlib.crc32(batch[0].id.encode()),
                stop_token_ids=self.generator.chat_stop_token_ids() if chat else [])
            prompts = [render_prompt(self.generator, item, self.prompt_format) for item in batch]
            completions = self.generator.complete(prompts, params, stop)
            for i in range(len(batch)):
                out.append([c.text for c in completions[i * sampling.n:(i + 1) * sampling.n]])
            if progress is not None:
                progress(len(batch))
        return out
