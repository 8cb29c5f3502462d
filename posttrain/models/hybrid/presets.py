"""Named model shapes: ``tiny`` (trains on a CPU in minutes) and the published Granite 4.0-H shapes.

The Granite shapes follow the published config.json files (see the project's granite_shapes notes); fields the
published table leaves open keep the config defaults. Build the large ones on the meta device:
``with torch.device("meta"): HybridForCausalLM(preset("granite-4.0-h-small"))``.
"""

from __future__ import annotations

from typing import Any

from posttrain.models.hybrid.configuration import HybridConfig


def _tiny(**fields: Any) -> dict[str, Any]:
    """The tiny shape: 6 layers, attention at layer 3 (the rest Mamba-2), ``fields`` on top."""
    return {
        "vocab_size": 2048, "hidden_size": 128, "num_hidden_layers": 6,
        "layer_types": ["mamba", "mamba", "mamba", "attention", "mamba", "mamba"],
        "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_n_heads": 8, "mamba_d_head": 32, "mamba_d_state": 32,
        "mamba_n_groups": 1, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 64,
        "position_embedding_type": "nope", "tie_word_embeddings": True, "max_position_embeddings": 4096, **fields,
    }


def _granite_4_0_h(**fields: Any) -> dict[str, Any]:
    """What the published Granite 4.0-H shapes share (40 layers, attention at 5, 15, 25, 35), ``fields`` on top."""
    return {
        "vocab_size": 100352, "num_hidden_layers": 40,
        "layer_types": ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
        "mamba_d_head": 64, "mamba_d_state": 128, "mamba_expand": 2, "mamba_d_conv": 4, "mamba_n_groups": 1,
        "position_embedding_type": "nope", "tie_word_embeddings": True, **fields,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # ~2M parameters, dense.
    "tiny": _tiny(num_local_experts=0, num_experts_per_tok=1, intermediate_size=0, shared_intermediate_size=256),
    # The same with a mixture of 4 experts (top-2) beside the shared MLP.
    "tiny-moe": _tiny(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, shared_intermediate_size=128),
    "granite-4.0-h-micro": _granite_4_0_h(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=64, num_local_experts=0,
        num_experts_per_tok=1, intermediate_size=0, shared_intermediate_size=8192, embedding_multiplier=12.0,
        logits_scaling=8.0, attention_multiplier=0.015625,
    ),
    "granite-4.0-h-tiny": _granite_4_0_h(
        hidden_size=1536, num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, num_local_experts=64,
        num_experts_per_tok=6, intermediate_size=512, shared_intermediate_size=1024,
    ),
    "granite-4.0-h-small": _granite_4_0_h(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=128, num_local_experts=72,
        num_experts_per_tok=10, intermediate_size=768, shared_intermediate_size=1536,
    ),
}


def preset(name: str, **overrides: Any) -> HybridConfig:
    """A config by preset name, with field overrides (``preset("tiny", vocab_size=len(tokenizer))``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return HybridConfig(**{**PRESETS[name], **overrides})
