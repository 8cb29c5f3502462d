"""Parity with transformers' GraniteMoeHybridForCausalLM: same weights, both directions, logits and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteMoeHybridForCausalLM

from posttrain.models.hybrid import HybridConfig, HybridForCausalLM

BASE = {
    "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 4, "layer_types": ["mamba", "attention", "mamba", "mamba"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8,
    "shared_intermediate_size": 24, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 3.0,
    "attention_multiplier": 0.2, "pad_token_id": 0,
}
CONFIGS = {
    "dense-nope": {"num_local_experts": 0, "num_experts_per_tok": 1, "intermediate_size": 0},
    "moe-nope": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16},
    "dense-rope": {"num_local_experts": 0, "num_experts_per_tok": 1, "intermediate_size": 0,
                       "position_embedding_type": "rope", "rope_theta": 500.0},
    "moe-rope-groups": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16,
                            "position_embedding_type": "rope", "mamba_n_groups": 2},
}


def _hf_norm_per_group() -> bool:
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as m

    return "group_size" in m.GraniteMoeHybridRMSNormGated.__init__.__code__.co_varnames


def _pair(name: str, direction: str, tmp_path):
    torch.manual_seed(0)
    config = HybridConfig(**BASE, **CONFIGS[name], mamba_norm_per_group=_hf_norm_per_group())
    if direction == "ours->hf":
        ours = HybridForCausalLM(config)
        with torch.no_grad():  # non-trivial values for the parameters initialised to constants
            for n, p in ours.named_parameters():
                if n.endswith(("D", "dt_bias", "norm.weight", "layernorm.weight")):
                    p.add_(0.1 * torch.randn_like(p))
        ours.save_pretrained(tmp_path)
        theirs = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    else:
        theirs = GraniteMoeHybridForCausalLM(config.to_transformers()).float()
        theirs.save_pretrained(tmp_path)
        ours = HybridForCausalLM.from_pretrained(tmp_path)
    return ours.float(), theirs.float()


def _grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad for n in names}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("direction", ["ours->hf", "hf->ours"])
def test_logits_and_gradients_match(name, direction, tmp_path):
    ours, theirs = _pair(name, direction, tmp_path)
    torch.manual_seed(1)
    ids = torch.randint(1, BASE["vocab_size"], (2, 21))  # 21: not a multiple of the chunk size 8
    out_ours = ours(ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    # transformers 5 renames the expert tensors in memory; compare through the on-disk names
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    renames = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
               "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
               "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight"}
    compared = 0
    for n, p in ours.named_parameters():
        hf_name = n
        for a, b in renames.items():
            hf_name = hf_name.replace(a, b)
        g = theirs_grads[hf_name]
        assert p.grad is not None and g is not None, n
        err = (p.grad - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{n}: relative gradient error {err:.2e}"
        compared += 1
    assert compared == len(theirs_grads)


@pytest.mark.parametrize("name", ["dense-nope", "moe-rope-groups"])
def test_left_padded_batch_matches_transformers(name, tmp_path):
    ours, theirs = _pair(name, "ours->hf", tmp_path)
    torch.manual_seed(2)
    ids = torch.randint(1, BASE["vocab_size"], (3, 19))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    a = ours(ids, attention_mask=mask).logits
    b = theirs(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-4)
    # and a left-padded row equals the same row without padding (NoPE: positions do not matter)
    if "nope" in name:
        alone = ours(ids[2:3, 11:]).logits[0]
        torch.testing.assert_close(a[2, 11:], alone, atol=1e-5, rtol=1e-5)
