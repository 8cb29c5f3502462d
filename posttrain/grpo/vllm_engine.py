"""The colocated vLLM rollout engine: vLLM runs in the trainer's process on the same GPU.

Same interface as the native engine (``generate(prompts, SamplingParams) -> list[Completion]``, prompt-major),
plus ``sync_weights(model)``: after every optimizer step the trainer's tensors are handed to vLLM's
``load_weights`` under their checkpoint names as they are (they already are transformers' GraniteMoeHybrid
names, so there is no hand-written mapping that could miss a tensor). vLLM is configured for RL on hybrids:
its Mamba state cache in float32 (``mamba_ssm_cache_dtype``), log-probabilities of the processed (temperature-
scaled) distribution, no prefix caching, sleep mode between rollouts to give its memory back to training. The
trainer turns truncated importance sampling on by default with this engine, because vLLM's Mamba prefill and
decode kernels differ from training's and some mismatch is built in; it logs the mismatch every step.

vLLM is an optional extra (``pip install posttrain[vllm]``, GPU only): importing this module never imports it;
building the engine without it is a clear error. This module never trains.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch

from posttrain.engine import Completion, SamplingParams


class VllmUnavailableError(ImportError):
    """rollout.engine is vllm but vLLM (or a CUDA device) is not there."""


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise VllmUnavailableError(
            "rollout.engine: vllm needs vLLM, an optional extra for CUDA machines: pip install 'posttrain[vllm]' "
            f"(import failed: {e}); on a CPU machine use rollout.engine: native") from None
    if not torch.cuda.is_available():
        raise VllmUnavailableError("rollout.engine: vllm needs a CUDA device; use rollout.engine: native")
    return vllm


class VllmEngine:
    """Colocated vLLM for rollouts; see the module docstring."""

    def __init__(self, model, config, tokenizer, max_model_len: int | None = None):
        # The trainer and vLLM share this process, so vLLM's engine core must run in it too (weights are pushed
        # by reference to its model object).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        self._vllm = vllm
        r = config.rollout
        self._folder = tempfile.mkdtemp(prefix="posttrain-vllm-")
        model.save_pretrained(self._folder)  # the starting weights, in the checkpoint layout vLLM reads
        tokenizer.save_pretrained(self._folder)
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[model.dtype]
        self.llm = vllm.LLM(
            model=self._folder,
            dtype=dtype,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            max_model_len=max_model_len or (config.data.max_prompt_tokens + r.max_new_tokens),
            enable_sleep_mode=r.vllm_sleep,
            enable_prefix_caching=False,
            mamba_ssm_cache_dtype="float32",
            logprobs_mode="processed_logprobs",
            seed=config.run.seed,
        )
        self.sleeping = False
        self.sync_weights(model)

    @classmethod
    def from_checkpoint(cls, path: str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.9,
                        max_model_len: int = 4096, seed: int = 0) -> VllmEngine:
        """vLLM on a checkpoint folder, for ``posttrain vllm-serve`` (weights then arrive by ``load_named_tensors``)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model object must be in this process
        vllm = _import_vllm()
        self = cls.__new__(cls)
        self._vllm, self._folder, self.sleeping = vllm, None, False
        self.llm = vllm.LLM(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enable_prefix_caching=False,
                            mamba_ssm_cache_dtype="float32", logprobs_mode="processed_logprobs", seed=seed)
        return self

    @torch.no_grad()
    def load_named_tensors(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Load ``(checkpoint name, tensor)`` pairs into vLLM's model (what the server mode's sync received)."""
        self._model().load_weights(weights=iter(items))
        self.llm.reset_prefix_cache()

    def _model(self) -> Any:
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is None:  # vLLM V1 in-process: the engine core holds the executor
            executor = engine.engine_core.engine_core.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Push every tensor of ``model`` into vLLM by its checkpoint name; returns how many were pushed."""
        self.wake_up()
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        self._model().load_weights(weights=iter(weights))
        self.llm.reset_prefix_cache()
        return len(weights)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """vLLM's own parameters by its names (fused projections included), for tests."""
        return dict(self._model().named_parameters())

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sleep(self) -> None:
        """Free vLLM's KV/state cache (level 1 keeps the weights) while the trainer runs."""
        if not self.sleeping and self.llm.llm_engine.vllm_config.model_config is not None:
            self.llm.sleep(level=1)
            self.sleeping = True

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        vllm = self._vllm
        self.wake_up()
        sp = vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens, logprobs=0, seed=params.seed, stop_token_ids=params.stop_ids(),
            ignore_eos=params.ignore_eos,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
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
