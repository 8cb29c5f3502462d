"""The in-tree Granite models: the Granite 4.0-H hybrid (weight-compatible with transformers' GraniteMoeHybrid and
vLLM) and dense Granite (transformers' ``granite``: an all-attention stack of the same layers)."""

from posttrain.models.hybrid.checkpoint import CheckpointError
from posttrain.models.hybrid.configuration import IN_TREE_MODEL_TYPES, ConfigError, DenseGraniteConfig, HybridConfig
from posttrain.models.hybrid.modeling import HybridCache, HybridForCausalLM
from posttrain.models.hybrid.presets import PRESETS, preset

__all__ = [
    "IN_TREE_MODEL_TYPES",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DenseGraniteConfig",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "preset",
]
