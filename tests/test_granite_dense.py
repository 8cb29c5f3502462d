"""Dense Granite (transformers' ``granite``, ``GraniteForCausalLM``) in-tree: checkpoints saved by transformers load
with their own tensor names and fields, and the in-tree model matches transformers' on the same weights (logits,
gradients, RoPE with and without scaling, left padding), packs rows, decodes on the native engine, trains through
``posttrain sft`` with packing, and saves back a checkpoint transformers loads unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GraniteConfig, GraniteForCausalLM

from posttrain.models.hybrid import CheckpointError, ConfigError, DenseGraniteConfig, HybridForCausalLM
from posttrain.rollout import SamplingParams
from posttrain.rollout.native import NativeEngine

VOCAB = 101
BASE = {
    "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 3, "num_attention_heads": 6,
    "num_key_value_heads": 2, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
    "attention_multiplier": 0.0078125, "logits_scaling": 8.0, "rope_theta": 5000.0, "pad_token_id": 0,
    "max_position_embeddings": 512,
}
VARIANTS = {
    "plain": {},
    "bias-tied": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "rope-yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
}


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores; one thread per process avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def transformers_model(variant: str = "plain", seed: int = 0) -> GraniteForCausalLM:
    """transformers' own GraniteForCausalLM, random init, with non-trivial norm weights and biases."""
    torch.manual_seed(seed)
    model = GraniteForCausalLM(GraniteConfig(**BASE, **VARIANTS[variant])).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def pair(variant: str, tmp_path, seed: int = 0):
    theirs = transformers_model(variant, seed)
    theirs.save_pretrained(tmp_path / "hf")
    return HybridForCausalLM.from_pretrained(tmp_path / "hf").eval(), theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_gradients_match_transformers(variant, tmp_path):
    ours, theirs = pair(variant, tmp_path)
    assert isinstance(ours.config, DenseGraniteConfig)
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 37))  # 37: not a multiple of any chunk or block size
    out_ours = ours(ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    assert (out_theirs.logits - out_theirs.logits.mean()).abs().max() > 1e-2  # not a degenerate comparison
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs_params)  # the same tensor names, all trainable
    for name, p in ours_params.items():
        g = theirs_params[name].grad
        err = (p.grad - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_rope_past_the_trained_length_matches_transformers(tmp_path):
    ours, theirs = pair("plain", tmp_path)
    ids = torch.randint(1, VOCAB, (1, 301))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_transformers_and_each_row_alone(tmp_path):
    ours, theirs = pair("plain", tmp_path)
    torch.manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 23))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :14] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's own positions, as generate() gives them
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=positions).logits
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        keep = mask.bool()
        torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-4)
        for row, start in ((0, 5), (2, 14)):
            alone = theirs(input_ids=ids[row:row + 1, start:]).logits[0]
            torch.testing.assert_close(a[row, start:], alone, atol=1e-4, rtol=1e-4)
        # without position_ids both sides count positions from the row's first (padded) slot
        a = ours(ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-4)


def test_packed_rows_equal_one_by_one(tmp_path):
    ours, theirs = pair("bias-tied", tmp_path)
    torch.manual_seed(3)
    seqs = [torch.randint(1, VOCAB, (n,)) for n in (11, 1, 29, 6)]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    labels = ids.masked_fill(positions == 0, -100)  # no target across a boundary
    packed = ours(ids, position_ids=positions, labels=labels)
    start = 0
    for s in seqs:
        alone = ours(s[None]).logits[0]
        torch.testing.assert_close(packed.logits[0, start:start + len(s)], alone, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            hf = theirs(input_ids=s[None]).logits[0]
        torch.testing.assert_close(alone, hf, atol=1e-4, rtol=1e-4)
        start += len(s)
    # and the gradients of a packed row are those of the sequences' summed losses, one by one
    ours.zero_grad()
    packed.loss.backward()
    g_packed = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    n_targets = sum(len(s) - 1 for s in seqs)
    total = sum(ours(s[None], labels=s[None]).loss * (len(s) - 1) for s in seqs if len(s) > 1) / n_targets
    total.backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("variant", ["plain", "rope-linear"])
def test_native_engine_greedy_equals_transformers_generate(variant, tmp_path):
    ours, theirs = pair(variant, tmp_path)
    theirs.generation_config.eos_token_id = None
    torch.manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in (7, 13, 2)]  # unequal: the packed prefill
    same = [torch.randint(1, VOCAB, (9,)).tolist() for _ in range(2)]  # equal: one prompt per row
    for batch in (prompts, same):
        completions = NativeEngine(ours).generate(batch, SamplingParams(max_new_tokens=20, temperature=0,
                                                                        ignore_eos=True))
        for prompt, completion in zip(batch, completions):
            ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
            assert completion.token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["bias-tied", "rope-yarn"])
def test_saved_checkpoint_loads_in_transformers_unchanged(variant, tmp_path):
    ours, theirs = pair(variant, tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "granite" and written["architectures"] == ["GraniteForCausalLM"]
    back, info = GraniteForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for field in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                  "attention_bias", "mlp_bias", "tie_word_embeddings", "num_key_value_heads"):
        assert getattr(back.config, field) == getattr(theirs.config, field), field
    assert back.config.rope_parameters == theirs.config.rope_parameters
    ids = torch.randint(1, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=0, rtol=0)
    # the tensor names on disk are transformers' own
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(
        load_file(tmp_path / "hf" / "model.safetensors"))


def test_checkpoint_not_matching_its_config_is_a_clear_error(tmp_path):
    theirs = transformers_model()
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 48)
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        HybridForCausalLM.from_pretrained(tmp_path)
    message = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight in model.safetensors has shape [5, 48]" in message
    assert "[72, 48]" in message
    assert "missing tensors: model.layers.2.self_attn.k_proj.weight" in message

    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: config field 'rope_parameters\.rope_type': 'dynamic'"):
        HybridForCausalLM.from_pretrained(tmp_path)


def test_sft_with_packing_trains_and_exports_as_granite(tmp_path):
    import random

    from posttrain.config import load_config
    from posttrain.export import export_checkpoint, generate_key
    from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
    from posttrain.tokenizer import build_tokenizer
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import is_hybrid_folder, run_training

    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=200)
    torch.manual_seed(5)
    base = GraniteForCausalLM(GraniteConfig(**{**BASE, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                               "eos_token_id": tok.eos_token_id, "bos_token_id": None}))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    assert is_hybrid_folder(tmp_path / "base")  # trained, saved and exported by the in-tree model
    rng = random.Random(2)
    rows = [arithmetic_problem(rng) for _ in range(12)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"model: {{path: {tmp_path / 'base'}}}\n"
        f"data: {{train_files: [{tmp_path / 'pc.jsonl'}], prompt_field: question, completion_field: answer, "
        "max_length: 128, packing: true}\n"
        "optim: {lr: 3.0e-3, per_device_batch_size: 2, max_steps: 6, warmup_steps: 1}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
        "logging: {progress: false}\n")
    result = run_training(load_config(TrainConfig, recipe), "sft")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert result.steps == 6 and losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    generate_key(tmp_path / "key.pem")
    export_checkpoint(final, tmp_path / "export", tmp_path / "key.pem")
    exported, info = GraniteForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32,
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    trained = HybridForCausalLM.from_pretrained(final).eval()
    changed = [n for n, p in base.state_dict().items() if not torch.equal(p, trained.state_dict()[n])]
    assert changed  # the weights were trained, under their transformers names
    exported.eval().generation_config.eos_token_id = None
    prompt = tok(rows[0]["question"])["input_ids"]
    ref = exported.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    got = NativeEngine(trained).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert got[0].token_ids == ref[0, len(prompt):].tolist()


def test_lora_adapters_on_every_projection_match_transformers_with_the_same_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    ours, theirs = pair("bias-tied", tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        adapters = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
        for p in adapters.values():
            p.normal_(0.0, 0.2)  # lora_B starts at zero: make every adapter count
        missing = ours.load_state_dict(adapters, strict=False)
        assert not missing.unexpected_keys
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(adapters)
    ids = torch.randint(1, VOCAB, (2, 17))
    a = ours(input_ids=ids, labels=ids)
    b = theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    a.loss.backward()
    b.loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            err = (p.grad - theirs_grads[n]).norm() / theirs_grads[n].norm().clamp(min=1e-12)
            assert err < 1e-4, f"{n}: relative gradient error {err:.2e}"


def test_sft_and_export_of_a_checkpoint_not_matching_its_config_stop_with_one_line(tmp_path, capsys):
    import random

    from posttrain.cli import main as cli
    from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=200)
    model_dir = tmp_path / "base"
    GraniteForCausalLM(GraniteConfig(**{**BASE, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
                       ).save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"][:, :40].contiguous()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    rng = random.Random(0)
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(arithmetic_problem(rng)) + "\n" for _ in range(4)))
    (tmp_path / "sft.yaml").write_text(
        f"model: {{path: {model_dir}}}\n"
        f"data: {{train_files: [{tmp_path / 'pc.jsonl'}], prompt_field: question, completion_field: answer, "
        "max_length: 128, packing: true}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
        "optim: {per_device_batch_size: 2, max_steps: 1}\nlogging: {progress: false}\n")
    want = "tensor model.layers.0.self_attn.o_proj.weight in model.safetensors has shape [48, 40]"
    for argv in (["sft", "--config", str(tmp_path / "sft.yaml")],
                 ["export", "--model", str(model_dir), "--out", str(tmp_path / "export"), "--key",
                  str(tmp_path / "key.pem"), "--generate-key"]):
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("posttrain ")]  # (datasets prints progress)
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "export").exists()


def test_a_granite_3_config_json_with_legacy_rope_fields_loads_as_transformers_reads_it(tmp_path):
    theirs = transformers_model("plain")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]  # the Granite 3.x layout: rope_theta at the top, rope_scaling beside it
    config["rope_theta"] = 10000000.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = GraniteForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = HybridForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == 10000000.0 and ours.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ids = torch.randint(1, VOCAB, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
