"""The in-tree Granite 4.0-H hybrid model (weight-compatible with transformers' GraniteMoeHybrid and vLLM)."""

from posttrain.models.hybrid.checkpoint import CheckpointError
from posttrain.models.hybrid.configuration import ConfigError, HybridConfig
from posttrain.models.hybrid.modeling import CausalLMOutput, HybridCache, HybridForCausalLM
from posttrain.models.hybrid.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "preset",
]
