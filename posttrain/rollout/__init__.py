"""Rollout engines: one protocol (:mod:`posttrain.rollout.base`), chosen by name (:mod:`posttrain.rollout.registry`).

- ``native`` / ``native_decode``: the in-tree models' engine and its prefill and decode step;
- ``transformers_engine``: any causal LM transformers loads; ``vllm``: vLLM on a GPU; ``remote``: a rollout server;
- ``constrained``: grammar-constrained decoding (JSON, JSON schemas) with xgrammar, for ``SamplingParams.constraint``;
- ``batching``: concurrent requests batched onto one engine (``posttrain serve``); ``multiturn``: tool-use rollouts;
  ``async_rollout``: rollouts in a background thread; ``weight_sync``: the trainer's broadcast to rollout servers;
- ``cli``: ``posttrain generate``.
Importing this package imports no engine (and never vLLM): ``registry.build_engine`` imports the one it builds.
"""

from posttrain.rollout.base import Capabilities, Completion, Engine, EngineError, SamplingParams, StepTokens

__all__ = ["Capabilities", "Completion", "Engine", "EngineError", "SamplingParams", "StepTokens"]
