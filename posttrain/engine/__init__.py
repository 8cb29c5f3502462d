"""Rollout and serving engines. ``native`` (the in-tree model, CPU and GPU) is the default."""

from posttrain.engine.native import (
    Completion,
    EngineStats,
    NativeEngine,
    SamplingParams,
    StepCallback,
    StepTokens,
    sample,
)

__all__ = ["Completion", "EngineStats", "NativeEngine", "SamplingParams", "StepCallback", "StepTokens", "sample"]
