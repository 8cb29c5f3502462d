"""Any transformers causal LM through every stage: Llama, Qwen2 and Granite, built by transformers itself (random
init, ``save_pretrained``) with the in-tree tokenizer and chat template, vocab_size matched. (A ``granite`` folder
runs on the in-tree dense Granite where posttrain has it; Llama and Qwen2 run as transformers' own classes.)

- Packed rows (one padding-free row, ``position_ids`` restarting at 0, ``attention_mask=None``) give the SFT loss,
  its gradients and DPO's sequence log-probabilities that transformers gives each sequence run alone, within 1e-5 in
  float32, with the ``sdpa`` and ``eager`` attention implementations, for transformers' Llama, Qwen2, Granite,
  Qwen3, Mistral and Gemma classes.
- ``posttrain sft`` (packed), ``posttrain dpo`` (packed, LoRA on the family's default projections), ``posttrain merge``
  and ``posttrain export`` run on each family, and on the Granite 4.0-H hybrid twice: saved by posttrain's in-tree
  model and saved by transformers' ``GraniteMoeHybridForCausalLM`` (with experts and a shared expert); the merge is the weighted sum of its sources; the exported folder
  loads in transformers with no missing or unexpected keys and decodes greedily exactly as transformers does on the
  source weights after a save/load round trip.
- Bad input: an encoder or a vision model is refused naming config.json before anything is written; LoRA targets the
  model lacks are named; packing a model whose state crosses sequence boundaries (Mamba) is refused.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from posttrain.cli import main as cli
from posttrain.dpo.data import PreferencePair, collate_pairs
from posttrain.dpo.trainer import sequence_logps
from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer
from posttrain.train.data import IGNORE, collate_packed, load_segments
from posttrain.train.loop import masked_nll_sum

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,  # with tied input and output embeddings, as the small Qwen2 models have
    # Granite's multipliers away from 1, so a path that ignored one would not match transformers
    "granite": lambda **kw: GraniteConfig(embedding_multiplier=4.0, residual_multiplier=0.5,
                                          attention_multiplier=0.2, logits_scaling=2.0, **kw),
}
# packed rows are also checked on these (transformers' classes), the stages on FAMILIES only
PACKED_ONLY = {
    "qwen3": lambda **kw: Qwen3Config(head_dim=16, **kw),
    "mistral": MistralConfig,
    "gemma": lambda **kw: GemmaConfig(head_dim=16, **kw),
}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# the hybrid's default LoRA targets: its Mamba-2 in/out projections and its attention projections
HYBRID_PROJECTIONS = {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
# the Granite 4.0-H hybrid: Mamba-2, attention, Mamba-2 layers (no positional encoding), built two ways
HYBRIDS = ("hybrid", "granitemoehybrid")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300), vocab_size=300)


def tiny(family: str, tok, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {**FAMILIES, **PACKED_ONLY}[family](vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, tie_word_embeddings=family == "qwen2", **kw)
    return AutoModelForCausalLM.from_config(cfg).float()


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    """SFT chat rows and DPO prompt/chosen/rejected rows on arithmetic."""
    root = tmp_path_factory.mktemp("family_data")
    rng = random.Random(3)
    chats, prefs = [], []
    for _ in range(16):
        p = arithmetic_problem(rng)
        chats.append({"messages": [{"role": "user", "content": p["question"]},
                                   {"role": "assistant", "content": p["answer"]}]})
        wrong = p["answer"].rsplit("#### ", 1)[0] + "#### " + str(int(p["answer"].rsplit("#### ", 1)[1]) + 1)
        prefs.append({"prompt": f"Question: {p['question']}\nAnswer:", "chosen": " " + p["answer"],
                      "rejected": " " + wrong})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    return root


# -- packed rows == one by one -----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [*FAMILIES, *PACKED_ONLY])
def test_packed_rows_equal_one_by_one(family, impl, tok, data):
    model = tiny(family, tok, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    segments = load_segments([data / "chat.jsonl"], tok, task="sft", max_length=128)[:4]

    # packed: our collation and loss, one row with restarting position_ids and no attention mask
    batch = collate_packed([segments])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    packed_sum, n, _ = masked_nll_sum(model, batch, moe_aux=False)
    packed_sum.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    # one by one: transformers' own loss on each sequence alone (its mean times its target count)
    alone_sum = torch.zeros(())
    for s in segments:
        labels = torch.tensor([s.labels])
        out = model(input_ids=torch.tensor([s.input_ids]), labels=labels)
        alone_sum = alone_sum + out.loss * int((labels[:, 1:] != IGNORE).sum())
    alone_sum.backward()
    assert n == sum(s.n_targets for s in segments)
    torch.testing.assert_close(packed_sum, alone_sum, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-5, atol=1e-5, msg=k)

    # the comparison has power: the same row under one causal mask (no boundaries) scores differently
    with torch.no_grad():
        crossed = model(input_ids=batch["input_ids"], labels=batch["labels"],
                        attention_mask=torch.ones_like(batch["input_ids"])).loss * n
    assert abs(float(crossed) - float(alone_sum)) > 1e-3

    # DPO: each completion's summed log-probability from one packed row of all chosen and rejected sequences
    g = random.Random(7)
    pairs = [PreferencePair([g.randrange(len(tok)) for _ in range(g.randint(3, 9))],
                            [g.randrange(len(tok)) for _ in range(g.randint(2, 6))],
                            [g.randrange(len(tok)) for _ in range(g.randint(2, 6))], i, f"pair {i}") for i in range(3)]
    with torch.no_grad():
        packed_lp, _ = sequence_logps(model, collate_pairs(pairs, packed=True), "cpu")
        want = []
        for p in pairs:
            for completion in (p.chosen_ids, p.rejected_ids):
                ids = torch.tensor([p.prompt_ids + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want.append(sum(float(logp[len(p.prompt_ids) - 1 + j, t]) for j, t in enumerate(completion)))
    torch.testing.assert_close(packed_lp, torch.tensor(want), rtol=1e-5, atol=1e-5)


# -- every stage -------------------------------------------------------------------------------------------------
def weights(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


def save_base(family: str, tok, folder) -> None:
    """A tiny random model of ``family`` saved to ``folder``: the hybrid by posttrain's in-tree class
    (``hybrid``) or by transformers' ``GraniteMoeHybridForCausalLM`` (``granitemoehybrid``, with 4 experts, top 2,
    and a shared expert), every other family by transformers."""
    if family not in HYBRIDS:
        tiny(family, tok).save_pretrained(folder)
        return
    from transformers import GraniteMoeHybridForCausalLM

    from posttrain.models.hybrid import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    config = HybridConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3,
                          layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
                          mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8, intermediate_size=32,
                          shared_intermediate_size=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id,
                          **({"num_local_experts": 4, "num_experts_per_tok": 2} if family == "granitemoehybrid" else {}))
    if family == "hybrid":
        HybridForCausalLM(config).save_pretrained(folder)
    else:
        GraniteMoeHybridForCausalLM(config.to_transformers()).save_pretrained(folder)


@pytest.mark.parametrize("family", [*FAMILIES, *HYBRIDS])
def test_family_runs_sft_dpo_merge_and_export(family, tok, data, tmp_path):
    base = tmp_path / "base"
    save_base(family, tok, base)
    tok.save_pretrained(str(base))
    tied_at_start = json.loads((base / "config.json").read_text()).get("tie_word_embeddings", False)
    projections = HYBRID_PROJECTIONS if family in HYBRIDS else PROJECTIONS
    common = "optim: {lr: 5.0e-3, per_device_batch_size: 2, max_steps: 3, schedule: constant}\nlogging: {progress: false}\n"

    # sft, packed: two bins of whole conversations per step
    (tmp_path / "sft.yaml").write_text(
        f"model: {{path: {base}}}\n"
        f"data: {{train_files: [{data / 'chat.jsonl'}], max_length: 256, packing: true}}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'sft'}, every_steps: 0}}\n" + common)
    assert cli(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0
    log = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    assert all(entry["tokens"] > 2 * 64 for entry in log)  # bins hold several conversations
    sft = weights(tmp_path / "sft" / "final")
    start = weights(base)
    assert set(sft) == set(start) and all(not torch.equal(sft[k], start[k]) for k in sft if "proj" in k)

    # dpo, packed, LoRA on the family's default targets: exactly its attention and MLP projections change
    (tmp_path / "dpo.yaml").write_text(
        f"model: {{path: {tmp_path / 'sft' / 'final'}}}\n"
        "lora: {enabled: true, r: 4, alpha: 8}\n"
        f"data: {{train_files: [{data / 'pairs.jsonl'}], max_length: 128, packing: true}}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'dpo'}, every_steps: 0}}\n" + common)
    assert cli(["dpo", "--config", str(tmp_path / "dpo.yaml")]) == 0
    adapter = json.loads((tmp_path / "dpo" / "final" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == projections
    dpo = weights(tmp_path / "dpo" / "final")
    changed = {k.rsplit(".", 2)[-2] for k in dpo if not torch.equal(dpo[k], sft[k])}
    assert changed == projections
    dlog = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert dlog[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert dlog[-1]["rewards/margin"] > dlog[0]["rewards/margin"]

    # merge: the weighted sum, tensor by tensor
    assert cli(["merge", str(tmp_path / "sft" / "final"), str(tmp_path / "dpo" / "final"), "--weights", "0.25",
                "0.75", "--out", str(tmp_path / "merged")]) == 0
    merged = weights(tmp_path / "merged")
    assert set(merged) == set(sft)
    for k in merged:
        torch.testing.assert_close(merged[k], 0.25 * sft[k] + 0.75 * dpo[k], rtol=1e-6, atol=1e-6)

    # export: loads in transformers strictly and decodes as transformers does on the source after save/load
    assert cli(["export", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "export"), "--key",
                str(tmp_path / "key.pem"), "--generate-key"]) == 0
    exported, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32,
                                                          output_loading_info=True)
    assert exported.config.model_type == ("granitemoehybrid" if family in HYBRIDS else family)
    tied = exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    assert tied == tied_at_start == (family == "qwen2")  # tied embeddings stay tied through training, merge, export
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    source.save_pretrained(tmp_path / "roundtrip")
    source = AutoModelForCausalLM.from_pretrained(str(tmp_path / "roundtrip"), dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        torch.testing.assert_close(exported(prompt).logits, source(prompt).logits, rtol=0, atol=0)
        assert torch.equal(exported.generate(prompt, **greedy), source.generate(prompt, **greedy))


# -- bad input ---------------------------------------------------------------------------------------------------
def sft_recipe(tmp_path, model_dir, data, *extra: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {model_dir}, tokenizer: {model_dir}}}\n"
                      f"data: {{train_files: [{data / 'chat.jsonl'}], max_length: 128}}\n"
                      f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
                      "optim: {per_device_batch_size: 2, max_steps: 1}\nlogging: {progress: false}\n" + "".join(extra))
    return recipe


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_a_model_no_stage_can_train_is_refused_naming_config_json(kind, tok, data, tmp_path, capsys):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    folder = tmp_path / kind
    if kind == "bert":
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)
    else:
        ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8)).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    for command in ("sft", "dpo"):
        assert cli([command, "--config", str(sft_recipe(tmp_path, folder, data))]) == 2
        err = capsys.readouterr().err
        assert f"{folder / 'config.json'}" in err and f"model_type '{kind}'" in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()  # refused before any work
    assert cli(["export", "--model", str(folder), "--out", str(tmp_path / "out"), "--key",
                str(tmp_path / "k.pem"), "--generate-key"]) == 2
    assert f"model_type '{kind}'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_lora_targets_the_model_lacks_are_named(tok, data, tmp_path, capsys):
    folder = tmp_path / "llama"
    tiny("llama", tok).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    recipe = sft_recipe(tmp_path, folder, data, "lora: {enabled: true, target_modules: [q_proj, in_proj]}\n")
    assert cli(["sft", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules" in err and "no module named in_proj" in err and "q_proj" in err


def test_packing_a_model_whose_state_crosses_sequences_is_refused(tok, data, tmp_path, capsys):
    from transformers import MambaConfig, MambaForCausalLM

    folder = tmp_path / "mamba"
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, state_size=8,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id)).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    assert cli(["sft", "--config", str(sft_recipe(tmp_path, folder, data))]) == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "mamba" in err and "packing: false" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the same model trains unpacked
    assert cli(["sft", "--config", str(sft_recipe(tmp_path, folder, data)), "--data.packing", "false"]) == 0


def test_weights_that_do_not_match_config_json_are_refused(tok, data, tmp_path, capsys):
    folder = tmp_path / "llama"
    tiny("llama", tok).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))  # a layer with no weights
    assert cli(["sft", "--config", str(sft_recipe(tmp_path, folder, data))]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "missing keys: model.layers.2." in err and "Traceback" not in err
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))  # other shapes
    assert cli(["export", "--model", str(folder), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "k.pem"),
                "--generate-key"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "mismatched keys: model.layers.0.mlp.down_proj.weight" in err
    assert not (tmp_path / "out").exists()


def test_a_model_whose_code_ships_with_the_checkpoint_is_refused(tok, data, tmp_path, capsys):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my_lm", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}))
    tok.save_pretrained(str(folder))
    assert cli(["sft", "--config", str(sft_recipe(tmp_path, folder, data))]) == 2
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and "'my_lm'" in err and "trust_remote_code" in err
    assert not (tmp_path / "run").exists()
