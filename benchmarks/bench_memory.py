"""Generation-state memory of a Granite-4.0-H-Micro-shaped model against the same model with every layer
attention, at 32K and 128K tokens of context, from the engine's own cache allocation (size formula, checked
against a real allocation at a small size). bf16 KV and conv state, float32 SSM state, as the engine allocates."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit

from posttrain.models.hybrid import HybridCache, preset


def main() -> None:
    micro = preset("granite-4.0-h-micro")
    all_attention = dataclasses.replace(micro, layer_types=["attention"] * micro.num_hidden_layers)
    # the formula is what the engine allocates: check it against a real allocation at a small size
    for config in (micro, all_attention):
        small = HybridCache.allocate(config, batch=1, max_len=64, dtype=torch.bfloat16)
        assert small.nbytes() == HybridCache.bytes_per_row(config, 64, dtype_bytes=2)
        assert all(t.element_size() == 4 for t in small.ssm.values())
        del small
    for tokens in (32 * 1024, 128 * 1024):
        ours = HybridCache.bytes_per_row(micro, tokens, dtype_bytes=2)
        anchor = HybridCache.bytes_per_row(all_attention, tokens, dtype_bytes=2)
        emit(f"generation_state_granite_h_micro_{tokens // 1024}k", ours / 2**20, anchor / 2**20, "MiB",
             higher_is_better=False, reduction_pct=round(100 * (1 - ours / anchor), 2),
             kv_only_bound_pct=round(100 * (1 - len(micro.attention_layers) / micro.num_hidden_layers), 2))


if __name__ == "__main__":
    main()
