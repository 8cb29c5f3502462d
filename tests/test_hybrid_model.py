"""The hybrid model on its own: packed rows, checkpoint layout against transformers', presets, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from posttrain.models.hybrid import (
    PRESETS,
    CheckpointError,
    ConfigError,
    DenseGraniteConfig,
    HybridCache,
    HybridConfig,
    HybridForCausalLM,
    preset,
)

SMALL = {"vocab_size": 61, "hidden_size": 32, "num_hidden_layers": 3, "layer_types": ["mamba", "attention", "mamba"],
             "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8,
             "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16, "shared_intermediate_size": 24}


@pytest.mark.parametrize("extra", [{}, {"position_embedding_type": "rope"}, {"mamba_n_groups": 2}])
def test_packed_row_equals_sequences_one_by_one(extra):
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(**SMALL, **extra)).eval()
    lengths = [7, 13, 1, 20]  # crosses chunk boundaries (chunk 8) inside and between sequences
    seqs = [torch.randint(0, 61, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = model(packed, position_ids=positions).logits[0]
    alone = torch.cat([model(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    # without the position ids the same row is one long sequence: the test above is not vacuous
    assert not torch.allclose(model(packed).logits[0], alone, atol=1e-3)


def test_packed_gradients_equal_unpacked():
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(**SMALL))
    seqs = [torch.randint(0, 61, (n,)) for n in (9, 17, 5)]
    packed = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = packed.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in seqs[:-1]]), 0)
    labels[0, starts[1:]] = -100  # the first token of each sequence is not predicted from the previous one
    model(packed, position_ids=positions, labels=labels).loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(len(s) - 1 for s in seqs)
    for s in seqs:  # token-weighted mean over the same targets
        (model(s[None], labels=s[None]).loss * (len(s) - 1) / total).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def _tensor_shapes(folder) -> dict[str, list[int]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("experts", [0, 4])
def test_checkpoint_names_and_shapes_equal_transformers(tmp_path, tie, experts):
    config = HybridConfig(**{**SMALL, "num_local_experts": experts, "num_experts_per_tok": 2 if experts else 1},
                          tie_word_embeddings=tie)
    HybridForCausalLM(config).save_pretrained(tmp_path / "ours")
    GraniteMoeHybridForCausalLM(config.to_transformers()).save_pretrained(tmp_path / "theirs")
    assert _tensor_shapes(tmp_path / "ours") == _tensor_shapes(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "granitemoehybrid"
    assert written["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert written["layer_types"] == ["mamba", "attention", "mamba"]


def _transformers_shapes_on_meta(config: HybridConfig) -> dict[str, list[int]]:
    """The tensors transformers' save_pretrained writes, from its model on the meta device, mapped back to the
    on-disk names (transformers 5 renames the expert tensors in memory and back on save)."""
    with torch.device("meta"):
        model = GraniteMoeHybridForCausalLM(config.to_transformers())
    shapes = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = name.replace("experts.gate_up_proj", "input_linear.weight")
        name = name.replace("experts.down_proj", "output_linear.weight")
        name = name.replace("router.weight", "router.layer.weight")
        shapes[name] = list(t.shape)
    return shapes


@pytest.mark.parametrize("name", ["granite-4.0-h-micro", "granite-4.0-h-tiny", "granite-4.0-h-small"])
def test_granite_presets_match_transformers_layout_without_allocating(name):
    config = preset(name)
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    from posttrain.models.hybrid.checkpoint import expected_tensors

    ours = {k: list(v) for k, v in expected_tensors(model).items()}
    assert ours == _transformers_shapes_on_meta(config)
    assert all(p.is_meta for p in model.parameters())
    # the published shapes (../shared/granite_shapes.md)
    assert config.attention_layers == [5, 15, 25, 35]
    assert config.mamba_n_heads * config.mamba_d_head == config.mamba_expand * config.hidden_size


def test_small_moe_transformers_mapping_is_really_a_rename(tmp_path):
    """The on-disk names our meta check maps to are the ones transformers actually writes."""
    config = HybridConfig(**SMALL)
    GraniteMoeHybridForCausalLM(config.to_transformers()).save_pretrained(tmp_path)
    assert _tensor_shapes(tmp_path) == _transformers_shapes_on_meta(config)


def test_granite_published_config_loads(tmp_path):
    data = {"model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"],
            **{k: v for k, v in PRESETS["granite-4.0-h-tiny"].items()}, "rope_theta": 10000,
            "position_embedding_type": "nope", "time_step_limit": [0.0, {"__float__": "Infinity"}],
            "some_future_field": 3}
    data["layer_types"] = ["full_attention" if t == "attention" else "linear_attention" for t in data["layer_types"]]
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = HybridConfig.load(tmp_path)
    assert config.attention_layers == [5, 15, 25, 35]
    assert config.extra == {"some_future_field": 3}
    assert GraniteMoeHybridConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})


@pytest.mark.parametrize("fields, needle", [
    ({"mamba_d_head": 7}, "mamba_d_head"),
    ({"mamba_n_heads": 6, "mamba_d_head": "auto"}, "mamba_d_head"),
    ({"mamba_n_groups": 3}, "mamba_n_groups"),
    ({"layer_types": ["mamba", "conv", "mamba"]}, "layer_types[1]"),
    ({"layer_types": ["mamba"]}, "layer_types"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
])
def test_inconsistent_config_names_the_field(fields, needle):
    with pytest.raises(ConfigError) as err:
        HybridConfig(**{**SMALL, **fields})
    assert needle in str(err.value)


@pytest.mark.parametrize("cls", [HybridConfig, DenseGraniteConfig])
@pytest.mark.parametrize("fields, needle", [
    ({"num_hidden_layers": "4"}, "field 'num_hidden_layers' must be an integer, got '4'"),
    ({"rms_norm_eps": [1e-6]}, "field 'rms_norm_eps' must be a number, got [1e-06]"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false, got 'yes'"),
])
def test_a_config_json_value_of_the_wrong_type_names_the_file_and_field(tmp_path, cls, fields, needle):
    """config.json is read from disk: a value of the wrong type is a ConfigError naming the file and the field,
    never a bare TypeError from deep inside the checks."""
    (tmp_path / "config.json").write_text(json.dumps({**cls().to_dict(), **fields}))
    with pytest.raises(ConfigError) as err:
        cls.load(tmp_path)
    assert str(err.value) == f"{tmp_path / 'config.json'}: {needle}"
    # what transformers writes stays readable: a list of EOS ids, a null pad id, an integer where a float is declared
    (tmp_path / "config.json").write_text(json.dumps({**cls().to_dict(), "eos_token_id": [2, 3], "pad_token_id": None,
                                                      "rms_norm_eps": 0, "logits_scaling": 8}))
    assert cls.load(tmp_path).eos_token_id == [2, 3]
    if cls is HybridConfig:
        (tmp_path / "config.json").write_text(json.dumps({**cls().to_dict(), "time_step_limit": 3}))
        with pytest.raises(ConfigError, match=r"config\.json: field 'time_step_limit' must be \[low, high\], got 3"):
            cls.load(tmp_path)


def test_bad_checkpoints_name_the_tensor(tmp_path):
    model = HybridForCausalLM(HybridConfig(**SMALL))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(str(path))

    missing = dict(good)
    del missing["model.layers.0.mamba.A_log"]
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.0\.mamba\.A_log"):
        HybridForCausalLM.from_pretrained(tmp_path)

    save_file({**good, "model.layers.9.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.9\.extra\.weight"):
        HybridForCausalLM.from_pretrained(tmp_path)

    bad = dict(good)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight .*shape \[8, 32\]"):
        HybridForCausalLM.from_pretrained(tmp_path)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = HybridForCausalLM(HybridConfig(**SMALL))
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = HybridForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path)  # transformers reads our shards too
    ids = torch.randint(0, 61, (1, 10))
    torch.testing.assert_close(theirs(input_ids=ids).logits, loaded(ids).logits, atol=1e-4, rtol=1e-4)


def test_cache_size_formula_matches_allocation():
    config = preset("tiny")
    cache = HybridCache.allocate(config, batch=3, max_len=50, dtype=torch.float32)
    assert cache.nbytes() == 3 * HybridCache.bytes_per_row(config, 50, dtype_bytes=4)
    assert set(cache.key) == set(config.attention_layers)  # no KV cache for Mamba layers
    assert set(cache.ssm) == set(config.mamba_layers) and not set(cache.ssm) & set(cache.key)
