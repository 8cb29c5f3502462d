"""Generation engines for ``posttrain eval``: the native engine, or vLLM when it is installed.

An engine turns evaluation items into ``n`` completion texts each. Both engines see the same prompts, rendered
here by the checkpoint's tokenizer: the chat template (with BFCL's tools) in ``chat`` format, the plain prompt
with the task's stop strings in ``plain`` format. Tests inject their own engine (anything with ``generate``) to
push chosen texts through the same scoring path. This module never scores and never changes weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from posttrain.eval.tasks import EvalItem
from posttrain.serving.generation import TextGenerator

ProgressFn = Callable[[int], None]  # called with the number of items just finished


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot run here (vLLM not installed)."""


@dataclass
class EvalSampling:
    """How completions are sampled: greedy (temperature 0, n = 1) or sampled (n per item)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (samples per item) must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one completion per item; got n={self.n}: "
                             "set --temperature > 0 to sample several")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_p must be in (0, 1], top_k >= 0 and max_new_tokens >= 1")


class EvalEngine(Protocol):
    name: str

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


class NativeEvalEngine:
    """Completions from the in-tree model on the native engine, ``batch_size`` items per call."""

    name = "native"

    def __init__(self, tokenizer: Any, model: Any, prompt_format: str = "auto", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generator = TextGenerator.for_model(tokenizer, model)
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
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, n=sampling.n, stop=stop,
                seed=None if sampling.seed is None else sampling.seed + zlib.crc32(batch[0].id.encode()),
                stop_token_ids=self.generator.chat_stop_token_ids() if chat else [])
            prompts = [render_prompt(self.generator, item, self.prompt_format) for item in batch]
            completions = self.generator.complete(prompts, params, stop)
            for i in range(len(batch)):
                out.append([c.text for c in completions[i * sampling.n:(i + 1) * sampling.n]])
            if progress is not None:
                progress(len(batch))
        return out


class VllmEvalEngine:
    """Completions from vLLM (GPU), same prompts as the native engine. Needs ``pip install 'posttrain[vllm]'``."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer: Any, prompt_format: str = "auto", **llm_options: Any):
        try:
            import vllm
        except ImportError as exc:
            raise EngineUnavailableError(
                "the vllm engine needs the vllm package, which is not importable here "
                f"({exc}); install it with pip install 'posttrain[vllm]' on a GPU machine, or use --engine native"
            ) from exc
        self._vllm = vllm
        self.prompt_format = resolve_prompt_format(tokenizer, prompt_format)
        self.generator = TextGenerator(tokenizer, None, vocab_size=len(tokenizer))  # renders prompts only
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **llm_options)

    def generate(self, items: list[EvalItem], sampling: EvalSampling,
                 progress: ProgressFn | None = None) -> list[list[str]]:
        chat = self.prompt_format == "chat"
        stop = [] if chat else sorted({s for item in items for s in item.stop})
        params = self._vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
            max_tokens=sampling.max_new_tokens, seed=sampling.seed, stop=stop or None,
            stop_token_ids=self.generator.chat_stop_token_ids() if chat else None, skip_special_tokens=False)
        prompts = [{"prompt_token_ids": render_prompt(self.generator, item, self.prompt_format)} for item in items]
        outputs = self.llm.generate(prompts, params)
        if progress is not None:
            progress(len(items))
        return [[o.text for o in out.outputs] for out in outputs]
