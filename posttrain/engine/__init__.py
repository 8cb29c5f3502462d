"""Rollout and serving engines. ``native`` (the in-tree model, CPU and GPU) is the default."""

from posttrain.engine.native import Completion, EngineStats, NativeEngine, SamplingParams, sample

__all__ = ["Completion", "EngineStats", "NativeEngine", "SamplingParams", "sample"]
