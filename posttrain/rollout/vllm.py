"""The vLLM engine (GPU): one wrapper for GRPO's colocated rollouts, ``posttrain vllm-serve``, eval and pairs.

Same protocol as every engine (``generate(prompt_ids, SamplingParams) -> list[Completion]``, prompt-major, the
sampled tokens' log-probabilities), plus weight sync, sleep and close. Built on a checkpoint folder
(``VllmEngine(folder)``), or on a policy being trained (``VllmEngine.for_policy``: its weights and tokenizer are saved
to a temporary folder vLLM starts from, removed by ``close``). ``sync_weights(model)`` hands the trainer's tensors to
vLLM's ``load_weights`` under their checkpoint names as they are (they already are transformers' names, so there is
no hand-written mapping that could miss a tensor); ``load_named_tensors`` does the same with what a server received.

vLLM is configured for RL on hybrids: its Mamba state cache in float32 (``mamba_ssm_cache_dtype``), log-probabilities
of the processed (temperature-scaled, truncated) distribution, no prefix caching, and, for GRPO, sleep mode between
rollouts to give its memory back to training. vLLM's Mamba prefill and decode kernels differ from training's, so some
mismatch is built in: GRPO turns truncated importance sampling on by default with this engine.

vLLM is an optional extra (``pip install posttrain[vllm]``, GPU only): importing this module never imports it;
building the engine without it, or without a CUDA device, is a clear error. This module never trains.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch

from posttrain.rollout.base import Capabilities, Completion, EngineError, SamplingParams

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VllmUnavailableError(EngineError):
    """The vllm engine was chosen but vLLM (or a CUDA device) is not there."""


def import_vllm(field: str = "engine", alternatives: str = "native or transformers"):
    """The ``vllm`` module, or a :class:`VllmUnavailableError` naming ``field`` and what to use instead."""
    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailableError(
            f"{field}: vllm needs the vllm package, an optional extra for CUDA machines: pip install "
            f"'posttrain[vllm]' (import failed: {e}); without it use {alternatives}") from None
    if not torch.cuda.is_available():
        raise VllmUnavailableError(f"{field}: vllm needs a CUDA device; without one use {alternatives}")
    return vllm


class VllmEngine:
    """vLLM in this process on one GPU; see the module docstring."""

    name = "vllm"
    capabilities = Capabilities(weight_sync=True, sleep=True, close=True)

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 4096, seed: int = 0, sleep_mode: bool = False, field: str = "engine",
                 alternatives: str = "native or transformers"):
        # weights are pushed by reference to vLLM's model object: its engine core must run in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = import_vllm(field, alternatives)
        self._folder: str | None = None  # a temporary folder this engine owns (for_policy)
        self.sleeping = False
        self.llm = self._vllm.LLM(
            model=str(model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=sleep_mode,
            enable_prefix_caching=False,
            mamba_ssm_cache_dtype="float32",
            logprobs_mode="processed_logprobs",
            seed=seed,
        )

    @classmethod
    def for_policy(cls, model, tokenizer, **options: Any) -> VllmEngine:
        """vLLM on the trainer's ``model`` (its current weights, saved to a temporary folder with ``tokenizer``); later
        weights arrive by ``sync_weights``."""
        folder = tempfile.mkdtemp(prefix="posttrain-vllm-")
        try:
            model.save_pretrained(folder)  # the starting weights, in the checkpoint layout vLLM reads
            tokenizer.save_pretrained(folder)
            options.setdefault("dtype", _DTYPES[model.dtype])
            self = cls(folder, **options)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folder = folder
        return self

    def _model(self) -> Any:
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is None:  # vLLM V1 in-process: the engine core holds the executor
            executor = engine.engine_core.engine_core.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    @torch.no_grad()
    def load_named_tensors(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Load ``(checkpoint name, tensor)`` pairs into vLLM's model (what the server mode's sync received)."""
        self.wake()
        self._model().load_weights(weights=iter(items))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Push every tensor of ``model`` into vLLM by its checkpoint name; returns how many were pushed."""
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        self.load_named_tensors(weights)
        return len(weights)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """vLLM's own parameters by its names (fused projections included), for tests."""
        return dict(self._model().named_parameters())

    def wake(self) -> None:
        """Take the caches back after ``sleep`` (generate and the weight loads call it)."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sleep(self) -> None:
        """Free vLLM's KV/state cache (level 1 keeps the weights) while the trainer runs."""
        if not self.sleeping and self.llm.llm_engine.vllm_config.model_config is not None:
            self.llm.sleep(level=1)
            self.sleeping = True

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.wake()
        sp = self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens, logprobs=0, seed=params.seed, stop_token_ids=params.stop_ids(),
            ignore_eos=params.ignore_eos,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
        result: list[Completion] = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs or [], strict=True)]
                result.append(Completion(i, ids, lps, "stop" if c.finish_reason == "stop" else "length"))
        return result

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
