"""The SFT training step on the in-tree hybrid: packed == unpacked (loss and gradients), the loss is the mean over
every target token of the global batch however it is split into micro-batches, gradient checkpointing changes
nothing, the MoE load-balancing loss is trained, and LoRA adapts exactly the Mamba and attention projections."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer
from posttrain.train.config import (
    CheckpointSettings,
    DataSettings,
    LoggingSettings,
    LoraSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    TrainConfig,
)
from posttrain.train.data import collate_packed, collate_padded, load_segments, pack_segments
from posttrain.train.loop import Trainer, masked_nll_sum
from posttrain.train.run import apply_lora


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores; one thread per process avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300), vocab_size=300)


@pytest.fixture(scope="module")
def segments(tok, tmp_path_factory):
    import random

    from posttrain.synthetic import arithmetic_problem

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(16):
            p = arithmetic_problem(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": p["question"]},
                                             {"role": "assistant", "content": p["answer"]}]}) + "\n")
    return load_segments([path], tok, task="sft", max_length=128)


def tiny(tok, name="tiny", seed=0):
    torch.manual_seed(seed)
    return HybridForCausalLM(preset(name, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id, bos_token_id=None))


def config(tmp_path, bs, accum, steps=3, **model_kw) -> TrainConfig:
    return TrainConfig(
        model=ModelSettings(preset="tiny", tokenizer="unused", **model_kw),
        data=DataSettings(train_files=["unused"], max_length=128, shuffle=True),
        optim=OptimSettings(lr=2e-3, per_device_batch_size=bs, grad_accumulation_steps=accum, max_steps=steps,
                            warmup_steps=1),
        checkpoint=CheckpointSettings(output_dir=str(tmp_path), every_steps=0),
        logging=LoggingSettings(progress=False), run=RunSettings(seed=0))


def losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_packed_equals_unpacked_loss_and_gradients(tok, segments):
    model = tiny(tok)
    grads = []
    for batch in (collate_packed([segments]), collate_padded([[s] for s in segments], tok.pad_token_id)):
        model.zero_grad()
        nll, n, _ = masked_nll_sum(model, batch, moe_aux=False)
        (nll / n).backward()
        grads.append((float(nll.detach() / n), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (lp, np_, gp), (lu, nu, gu) = grads
    assert np_ == nu == sum(s.n_targets for s in segments)
    assert lp == pytest.approx(lu, abs=1e-5)
    for k in gp:
        torch.testing.assert_close(gp[k], gu[k], atol=1e-5, rtol=1e-4, msg=k)


def test_loss_is_per_token_over_the_global_batch_whatever_the_split(tok, segments, tmp_path):
    items = [[s] for s in segments]
    runs = {}
    for name, bs, accum, packed, ckpt in [("4x1", 4, 1, False, False), ("2x2", 2, 2, False, False),
                                          ("1x4", 1, 4, True, False), ("2x2-gc", 2, 2, True, True)]:
        cfg = config(tmp_path / name, bs, accum, gradient_checkpointing=ckpt)
        trainer = Trainer(cfg, tiny(tok), items, packed=packed, pad_token_id=tok.pad_token_id)
        result = trainer.train()
        runs[name] = (losses(result.metrics_path), torch.cat([p.detach().flatten()
                                                              for p in result.model.parameters()]))
    ref_loss, ref_params = runs["4x1"]
    # the first step's loss is the per-token mean over the 4 sequences of the global batch
    first = [segments[i] for i in trainer.plan.global_indices(0)]
    model = tiny(tok)
    with torch.no_grad():
        nll, n, _ = masked_nll_sum(model, collate_packed([first]), moe_aux=False)
    assert ref_loss[0] == pytest.approx(float(nll) / n, abs=1e-5)
    for name, (curve, params) in runs.items():
        assert curve == pytest.approx(ref_loss, abs=1e-5), name
        # Adam divides by sqrt(v): a coordinate whose gradient is ~0 turns float noise into lr-sized steps, so a
        # handful of the 1.2M weights may differ by ~lr * 1e-2; every other weight agrees to 1e-5
        diff = (params - ref_params).abs()
        assert float(diff.max()) < 2e-4 and int((diff > 1e-5).sum()) < 50, (name, float(diff.max()))
    assert ref_loss[-1] < ref_loss[0]


def test_moe_load_balancing_loss_is_trained(tok, segments, tmp_path):
    items = pack_segments(segments, 128)
    routers = {}
    for aux in (True, False):
        cfg = config(tmp_path / f"moe-{aux}", 2, 1, steps=2, moe_aux_loss=aux)
        model = tiny(tok, "tiny-moe")
        model.config.router_aux_loss_coef = 1.0
        result = Trainer(cfg, model, items, packed=True, pad_token_id=tok.pad_token_id).train()
        metrics = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        assert ("aux_loss" in metrics[0]) == aux
        routers[aux] = result.model.model.layers[0].block_sparse_moe.router.layer.weight.detach().clone()
    assert metrics[0]["loss"] > 0
    assert not torch.allclose(routers[True], routers[False])  # the aux loss moved the routers


def test_router_loss_trains_a_transformers_mixture_of_experts_that_counts_num_experts(tok, segments, tmp_path):
    """Qwen2-MoE names its expert count ``num_experts`` (the in-tree models and Mixtral: ``num_local_experts``):
    ``model.moe_aux_loss`` trains its load-balancing loss all the same. The first step's logged loss is the NLL
    alone (equal with and without the router loss, from the same weights and batch), the router loss is logged
    apart, and it moves the routers."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    items = pack_segments(segments, 128)
    routers, logged = {}, {}
    for aux in (True, False):
        torch.manual_seed(0)
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=1.0, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None))
        cfg = config(tmp_path / f"qwen2moe-{aux}", 2, 1, steps=2, moe_aux_loss=aux)
        result = Trainer(cfg, model, items, packed=True, pad_token_id=tok.pad_token_id).train()
        logged[aux] = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        routers[aux] = result.model.model.layers[0].mlp.gate.weight.detach().clone()
    assert logged[True][0]["aux_loss"] > 0 and "aux_loss" not in logged[False][0]
    assert logged[True][0]["loss"] == pytest.approx(logged[False][0]["loss"], rel=1e-6)
    assert not torch.allclose(routers[True], routers[False])


def test_lora_trains_adapters_on_mamba_and_attention_projections(tok, segments, tmp_path):
    cfg = config(tmp_path, 2, 1, steps=2)
    cfg.lora = LoraSettings(enabled=True, r=4, alpha=8)
    base = tiny(tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, cfg.lora, fused_head=True)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
    result = Trainer(cfg, model, [[s] for s in segments], packed=False, pad_token_id=tok.pad_token_id).train()
    peft_model = result.model
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == ("lora_" in name)
    x = collate_packed([segments[:3]])
    with torch.no_grad():
        want = peft_model(x["input_ids"], position_ids=x["position_ids"]).logits
        merged = peft_model.merge_and_unload()
        got = merged(x["input_ids"], position_ids=x["position_ids"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
                           for k in changed)


def test_lora_run_writes_merged_final_and_adapter(tok, tmp_path):
    import random

    from posttrain.config import load_config
    from posttrain.models.hybrid import HybridForCausalLM
    from posttrain.synthetic import arithmetic_problem
    from posttrain.train.run import run_training

    rng = random.Random(2)
    rows = [arithmetic_problem(rng) for _ in range(8)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny(tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        f"model: {{path: {tmp_path / 'base'}}}\n"
        "lora: {enabled: true, r: 4, alpha: 8}\n"
        f"data: {{train_files: [{tmp_path / 'pc.jsonl'}], prompt_field: question, completion_field: answer, "
        "max_length: 128, packing: false}\n"
        "optim: {lr: 1.0e-2, per_device_batch_size: 2, max_steps: 2}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
        "logging: {progress: false}\n")
    run_training(load_config(TrainConfig, recipe), "sft")
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = HybridForCausalLM.from_pretrained(final).state_dict()
    before = base.state_dict()
    changed = {k for k in before if not torch.equal(merged[k], before[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in {"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
                           for k in changed)
    manifest = json.loads((final / "training_manifest.json").read_text())
    assert len(manifest["base"]["sha256"]) == 64 and manifest["config"]["lora"]["enabled"] is True
