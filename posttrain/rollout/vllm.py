"""The vLLM engine (GPU): one wrapper for GRPO's colocated rollouts, ``posttrain vllm-serve``, eval and pairs.

Same protocol as every engine, plus weight sync, sleep, close and prompt log-probabilities. The request features
map to vLLM's fields of the same names (the constraint to its structured outputs); reports are of the processed
distribution only, vLLM's ``logprobs_mode`` being an engine setting. Built on a checkpoint folder
(``VllmEngine(folder)``) or on a policy being trained (``VllmEngine.for_policy``). ``sync_weights(model)`` hands the
trainer's tensors to vLLM's ``load_weights`` under their checkpoint names as they are (they already are
transformers' names, so there is no hand-written mapping that could miss a tensor).

vLLM is configured for RL on hybrids: its Mamba state cache in float32 (``mamba_ssm_cache_dtype``), log-probabilities
of the processed (temperature-scaled, truncated) distribution, no prefix caching, and, for GRPO, sleep mode between
rollouts to give its memory back to training. vLLM's Mamba prefill and decode kernels differ from training's, so some
mismatch is built in: GRPO turns truncated importance sampling on by default with this engine.

vLLM is an optional extra (``pip install posttrain[vllm]``, GPU only): importing this module never imports it;
building the engine without it, or without a CUDA device, is a clear error. This module never trains.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from posttrain.families import checkpoint_state, is_in_tree
from posttrain.rollout.base import MAX_LOGPROBS, Capabilities, Completion, EngineError, SamplingParams

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
    capabilities = Capabilities(weight_sync=True, sleep=True, close=True, prompt_logprobs=True)

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
            # the starting weights, in the checkpoint layout vLLM reads (LoRA adapters applied)
            model.save_pretrained(folder, **({} if is_in_tree(model) else {"state_dict": checkpoint_state(model)}))
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
        """Push every tensor of ``model`` into vLLM by its checkpoint name (``posttrain.families.checkpoint_state``:
        LoRA adapters applied); returns how many were pushed."""
        weights = [(name, t.detach()) for name, t in checkpoint_state(model).items()]
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

    def _sampling_params(self, params: SamplingParams):
        """vLLM's SamplingParams for ``params``: the same names and meanings (vLLM's are the reference)."""
        if params.logprobs is not None and params.logprobs_mode != "processed":
            # vLLM's logprobs_mode is an engine setting, not a request's: this engine runs processed_logprobs, so
            # that Completion.logprobs is the sampled distribution's (what GRPO needs); raw reports need another
            raise ValueError("logprobs_mode: the vllm engine reports the processed distribution only "
                             f"(vLLM's logprobs_mode is set per engine), got {params.logprobs_mode!r}")
        extra = self._structured_outputs(params.constraint) if params.constraint is not None else {}
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_new_tokens, seed=params.seed, stop_token_ids=params.stop_ids(),
            ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
            min_tokens=params.min_tokens, logit_bias=params.logit_bias,
            logprobs=params.logprobs or 0,  # 0: the sampled token's own log-probability, for Completion.logprobs
            **extra,
        )

    def _structured_outputs(self, constraint) -> dict[str, Any]:
        """The constraint's JSON schema as vLLM's structured outputs (vLLM compiles it with its own xgrammar backend,
        over the tokenizer as xgrammar reads it: special tokens and control bytes are not kept out as
        ``posttrain.rollout.constrained`` keeps them)."""
        sampling = importlib.import_module("vllm.sampling_params")
        options = {"json": json.loads(constraint.schema), "disable_any_whitespace": not constraint.any_whitespace}
        if hasattr(sampling, "StructuredOutputsParams"):  # vLLM >= 0.11
            return {"structured_outputs": sampling.StructuredOutputsParams(**options)}
        return {"guided_decoding": sampling.GuidedDecodingParams(**options)}  # before 0.11

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.wake()
        sp = self._sampling_params(params)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
        result: list[Completion] = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                steps = c.logprobs or []
                lps = [step[tok].logprob for tok, step in zip(ids, steps, strict=True)]
                completion = Completion(i, ids, lps, "stop" if c.finish_reason == "stop" else "length")
                if params.logprobs is not None:  # processed: the same distribution as Completion.logprobs
                    completion.reported_logprobs = list(lps)
                    completion.top_logprobs = [_top(step, params.logprobs) for step in steps]
                result.append(completion)
        return result

    def prompt_logprobs(self, prompt_ids: list[list[int]], top_n: int
                        ) -> list[list[tuple[float, list[tuple[int, float]]] | None]]:
        """Each prompt token's log-probability given the ones before it, and the ``top_n`` most likely there (None
        for the first token); temperature 1 and no truncation, so that the processed distribution is the raw one."""
        if not 0 <= top_n <= MAX_LOGPROBS:
            raise ValueError(f"top_n must be in [0, {MAX_LOGPROBS}], got {top_n}")
        self.wake()
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_n)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
        result = []
        for prompt, out in zip(prompt_ids, outputs, strict=True):
            entries: list[tuple[float, list[tuple[int, float]]] | None] = [None]
            for token, step in zip(prompt[1:], out.prompt_logprobs[1:], strict=True):
                entries.append((step[token].logprob, _top(step, top_n)))
            result.append(entries)
        return result

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _top(step: dict, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, log-probability) pairs of one vLLM logprobs entry (token id -> Logprob, the
    sampled token's included whatever its rank), highest first."""
    ranked = sorted((lp.rank, token, lp.logprob) for token, lp in step.items() if lp.rank is not None and lp.rank <= k)
    return [(token, logprob) for _, token, logprob in ranked]
