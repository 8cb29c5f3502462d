"""Rollout engines: one protocol (:mod:`posttrain.rollout.base`), chosen by name."""

from posttrain.rollout.base import (
    Capabilities,
    Completion,
    Engine,
    EngineError,
    EngineStats,
    SamplingParams,
    StepCallback,
    StepTokens,
    sample,
)

__all__ = ["Capabilities", "Completion", "Engine", "EngineError", "EngineStats", "SamplingParams", "StepCallback",
           "StepTokens", "sample"]
