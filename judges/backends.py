"""Where a judge model runs: an OpenAI-compatible HTTP endpoint, transformers locally, or vLLM in-process.

``JudgeClient`` sits in front of a backend: it answers from the on-disk cache what it can, sends the rest with
bounded concurrency in input order, and stores each answer the moment it arrives. The HTTP backend retries 429s,
5xx, time-outs, dropped connections and unreadable bodies with exponential backoff, then fails with an error that
names the endpoint and the last problem. Backends only turn chat messages into answer text; they never parse
verdicts or decide what is kept.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Self

import httpx
from posttrain.judges.cache import JudgeCache, request_key
from posttrain.judges.config import BackendConfig, SamplingConfig

Messages = list[dict[str, Any]]


class JudgeBackendError(RuntimeError):
    """The judge could not be reached or kept failing; what was judged before is in the cache."""


def sampling_dict(sampling: SamplingConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(sampling).items() if v is not None}


class OpenAIBackend:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp, TGI, hosted APIs, posttrain serve)."""

    is_async = True

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.model = config.model
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
        self._client = httpx.AsyncClient(timeout=self.config.timeout_s, limits=limits, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.config.max_backoff_s)
            except ValueError:
                pass
        base = self.config.backoff_s * (2**attempt)
        return min(base * (0.5 + random.random()), self.config.max_backoff_s)

    async def acomplete(self, messages: Messages, sampling: dict[str, Any]) -> str:
        assert self._client is not None, "use the backend as an async context manager"
        body = {"model": self.model, "messages": messages, **sampling}
        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                response = await self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.config.timeout_s:g}s"
            except httpx.TransportError as exc:
                last = f"connection failed: {type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                        content = data["choices"][0]["message"]["content"]
                        if not isinstance(content, str):
                            raise TypeError("message.content is not a string")
                        return content
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        last = f"unreadable response body ({type(exc).__name__}: {exc}): {response.text[:200]!r}"
                elif response.status_code == 429 or response.status_code >= 500:
                    last = f"HTTP {response.status_code}: {response.text[:200]!r}"
                    retry_after = response.headers.get("retry-after")
                else:
                    raise JudgeBackendError(
                        f"judge endpoint {self.url} refused the request: HTTP {response.status_code}: "
                        f"{response.text[:300]!r} (check judge.backend.model and the API key)"
                    )
            if attempt < self.config.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise JudgeBackendError(
            f"judge endpoint {self.url} failed {self.config.max_retries + 1} times; last: {last}. "
            "Answers received so far are cached: rerun to resume."
        )


class TransformersBackend:
    """A local checkpoint through transformers: left-padded batches, the tokenizer's chat template."""

    is_async = False

    def __init__(self, config: BackendConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model = config.model
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        self.lm = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(config.device).eval()
        self.torch = torch

    def complete_batch(self, batch: list[Messages], sampling: dict[str, Any]) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.config.device)
        temperature = float(sampling.get("temperature", 0.0))
        kwargs: dict[str, Any] = {"max_new_tokens": int(sampling.get("max_tokens", 256)),
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(sampling.get("top_p", 1.0)))
            if sampling.get("seed") is not None:
                self.torch.manual_seed(int(sampling["seed"]))
        else:
            kwargs["do_sample"] = False
        with self.torch.no_grad():
            out = self.lm.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


class VLLMBackend:
    """vLLM in-process on a GPU (``pip install posttrain[vllm]``)."""

    is_async = False

    def __init__(self, config: BackendConfig) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise JudgeBackendError(
                "judge.backend.type=vllm needs vLLM: pip install 'posttrain[vllm]' (a GPU machine), "
                "or use type=openai against a vLLM server"
            ) from exc
        self.config = config
        self.model = config.model
        self.llm = LLM(model=config.model, dtype=config.dtype)
        self.SamplingParams = SamplingParams

    def complete_batch(self, batch: list[Messages], sampling: dict[str, Any]) -> list[str]:
        params = self.SamplingParams(
            temperature=float(sampling.get("temperature", 0.0)), top_p=float(sampling.get("top_p", 1.0)),
            max_tokens=int(sampling.get("max_tokens", 256)), seed=sampling.get("seed"),
        )
        outputs = self.llm.chat(batch, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


def make_backend(config: BackendConfig) -> OpenAIBackend | TransformersBackend | VLLMBackend:
    return {"openai": OpenAIBackend, "transformers": TransformersBackend, "vllm": VLLMBackend}[config.type](config)


@dataclass
class JudgeRequest:
    messages: Messages
    attempt: int = 0


class JudgeClient:
    """Answers judge requests from the cache or the backend; every new answer is cached as it arrives."""

    def __init__(self, backend: Any, cache: JudgeCache, sampling: SamplingConfig) -> None:
        self.backend = backend
        self.cache = cache
        self.sampling = sampling_dict(sampling)
        self.sent = 0  # requests answered by the backend in this process
        self.cached = 0  # requests answered from the cache

    def key(self, request: JudgeRequest) -> str:
        return request_key(self.backend.model, request.messages, self.sampling, request.attempt)

    def answer(self, requests: list[JudgeRequest], progress: Callable[[int], None] | None = None) -> list[str]:
        keys = [self.key(r) for r in requests]
        answers = self.cache.get_many(list(dict.fromkeys(keys)))
        self.cached += sum(1 for k in keys if k in answers)
        if progress:
            progress(sum(1 for k in keys if k in answers))
        todo: dict[str, JudgeRequest] = {}
        for key, request in zip(keys, requests):
            if key not in answers and key not in todo:
                todo[key] = request
        if todo:
            if self.backend.is_async:
                try:
                    asyncio.run(self._answer_async(todo, answers, progress))
                except BaseExceptionGroup as group:  # the first worker's failure cancelled the rest: report it
                    raise group.exceptions[0] from None
            else:
                self._answer_batched(todo, answers, progress)
        return [answers[k] for k in keys]

    def _store(self, key: str, request: JudgeRequest, answer: str, answers: dict[str, str]) -> None:
        self.cache.put(key, self.backend.model, {"messages": request.messages, "sampling": self.sampling,
                                                 "attempt": request.attempt}, answer)
        answers[key] = answer
        self.sent += 1

    async def _answer_async(self, todo: dict[str, JudgeRequest], answers: dict[str, str],
                            progress: Callable[[int], None] | None) -> None:
        queue = list(todo.items())
        position = 0

        async def worker() -> None:
            nonlocal position
            while position < len(queue):
                key, request = queue[position]
                position += 1
                answer = await self.backend.acomplete(request.messages, self.sampling)
                self._store(key, request, answer, answers)
                if progress:
                    progress(1)

        async with self.backend, asyncio.TaskGroup() as group:
            for _ in range(min(self.backend.config.concurrency, len(queue))):
                group.create_task(worker())

    def _answer_batched(self, todo: dict[str, JudgeRequest], answers: dict[str, str],
                        progress: Callable[[int], None] | None) -> None:
        items = list(todo.items())
        size = max(1, self.backend.config.batch_size)
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            outs = self.backend.complete_batch([r.messages for _, r in chunk], self.sampling)
            for (key, request), answer in zip(chunk, outs):
                self._store(key, request, answer, answers)
            if progress:
                progress(len(chunk))
