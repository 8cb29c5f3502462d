"""GRPO's ``model`` and ``lora`` groups mean what they mean for SFT and DPO, checked against independent
computations: ``model.dtype: bfloat16`` trains float32 master weights under bf16 autocast (the first AdamW step,
written out by hand, lands on the weights exactly); ``lora`` trains adapters only, the native engine decodes the
adapted policy as peft's own merge does, the KL reference is the starting model, and ``final/`` holds peft's
merged weights; ``model.moe_aux_loss`` trains the routers; a checkpoint's state with adapters applied is peft's
``merge_and_unload``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

from posttrain.families import checkpoint_state
from posttrain.grpo.batch import RolloutBatch
from posttrain.grpo.config import (
    CheckpointConfig,
    DynamicSamplingConfig,
    GrpoConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
)
from posttrain.grpo.trainer import GrpoTrainer
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.rollout import SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.tokenizer import build_tokenizer

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], vocab_size=64)


def _policy(tok, name: str = "tiny", seed: int = 0) -> HybridForCausalLM:
    sizes = {} if name != "tiny" else {"hidden_size": 64, "mamba_n_heads": 4, "mamba_d_head": 32,
                                       "mamba_d_state": 16, "shared_intermediate_size": 128, "num_hidden_layers": 4,
                                       "mamba_chunk_size": 16, "layer_types": ["mamba", "mamba", "attention", "mamba"]}
    config = preset(name, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    bos_token_id=None, **sizes)
    torch.manual_seed(seed)
    return HybridForCausalLM(config)


def digits(prompts, completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def _config(tmp_path, **groups) -> GrpoConfig:
    config = GrpoConfig(rollout=RolloutConfig(prompts_per_step=2, num_generations=4, max_new_tokens=6),
                        optim=OptimConfig(lr=3e-2, mini_batches=1, micro_batch_tokens=64),
                        rewards=RewardsConfig(num_workers=0), checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
                        run=RunConfig(seed=2, steps=2), logging=LoggingConfig(progress=False),
                        dynamic_sampling=DynamicSamplingConfig(enabled=False))
    for group, values in groups.items():
        for k, v in values.items():
            setattr(getattr(config, group), k, v)
    return config


def _trainer(config, tok, model=None) -> GrpoTrainer:
    return GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS,
                       reward_set=RewardSet([WeightedReward("digits", digits)]))


# ---------------------------------------------------------------------------------------------------------------
# model.dtype
# ---------------------------------------------------------------------------------------------------------------
def test_bfloat16_trains_float32_master_weights_under_autocast(tmp_path, tok, fresh_precision):
    """At GRPO's lr of 1e-6 the first AdamW step moves each weight by lr * g / (|g| + eps): float32 master weights
    take it exactly, where bfloat16 weights (8 bits of mantissa) would round most of it away."""
    start = tmp_path / "start"
    _policy(tok).save_pretrained(start)
    tok.save_pretrained(str(start))
    config = _config(tmp_path / "run", model={"path": str(start), "dtype": "bfloat16"},
                     optim={"lr": 1e-6, "schedule": "constant", "max_grad_norm": None})
    trainer = _trainer(config, tok)
    core = trainer.core
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in core.parameters()} == {torch.float32}
    seen = []
    core.model.layers[0].mamba.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = {n: p.detach().clone() for n, p in core.named_parameters()}
    grads = {}

    def keep(optimizer, args, kwargs):
        for n, p in core.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()

    trainer.chassis.optimizer.optimizer.register_step_pre_hook(keep)
    metrics = trainer.step()
    assert metrics["optim/updates"] == 1
    assert torch.bfloat16 in seen  # the training forward ran under bf16 autocast
    eps, moved = trainer.config.optim.eps, 0
    for n, p in core.named_parameters():
        g = grads.get(n)
        if g is None:
            continue
        expected = before[n] - 1e-6 * g / (g.abs() + eps)  # Adam's first step, bias-corrected: m = g, v = g^2
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-9), n
        moved += int((p.detach() != before[n]).sum())
    assert moved > 1000
    unit = before["model.layers.0.mamba.in_proj.weight"]
    assert (unit.bfloat16().float() - unit).abs().max() > 1e-6  # bf16 weights could not even hold the start


def test_model_preset_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"model\.preset: GRPO trains a checkpoint"):
        ModelConfig(preset="tiny", tokenizer="tok")


def test_lm_head_cannot_be_a_lora_target(tmp_path, tok):
    from posttrain.train.chassis import TrainingError

    config = _config(tmp_path, lora={"enabled": True, "target_modules": ["in_proj", "lm_head"]})
    with pytest.raises(TrainingError, match=r"lora\.target_modules: lm_head cannot be adapted"):
        _trainer(config, tok, _policy(tok))


# ---------------------------------------------------------------------------------------------------------------
# lora
# ---------------------------------------------------------------------------------------------------------------
def test_lora_trains_adapters_decodes_them_and_saves_peft_merge(tmp_path, tok):
    model = _policy(tok)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = _config(tmp_path, lora={"enabled": True, "r": 4, "alpha": 8}, loss={"beta": 0.1})
    trainer = _trainer(config, tok, model)
    for _ in range(2):
        trainer.step()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    assert any(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # adapters moved
    base = {k.replace(".base_layer", ""): v for k, v in peft_model.get_base_model().state_dict().items()
            if "lora_" not in k}
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)  # base untouched

    # the engine decodes the adapted policy: as a native engine on peft's own merge of it does
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    prompts = [tok.encode(r["prompt"]) for r in ROWS[:5]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    ours = trainer.engine.generate(prompts, params)
    theirs = NativeEngine(merged).generate(prompts, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    off = NativeEngine(copy.deepcopy(_policy(tok))).generate(prompts, params)
    assert any(max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > 1e-3
               for a, b in zip(ours, off, strict=True))  # the adapters change what is decoded

    # the KL reference is the starting model: the adapters disabled
    batch = RolloutBatch.build(trainer.last_batch, trainer.core.device)
    ref = batch.per_sample(trainer._frozen_logprobs(batch, "ref"))
    fresh = _policy(tok).eval()
    for s, lp in zip(batch.samples, ref, strict=True):
        with torch.no_grad():
            logits = fresh(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].double()
        expected = torch.log_softmax(logits, -1)[len(s.prompt_ids) - 1:-1].gather(
            -1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        assert (lp.double() - expected).abs().max() < 1e-4

    final = trainer.save_final()
    saved = HybridForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    want = merged.state_dict()
    assert saved.keys() == want.keys()
    assert all(torch.allclose(saved[k], want[k], atol=1e-6) for k in want)
    assert (final / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((final / "training_manifest.json").read_text())
    assert manifest["task"] == "grpo" and manifest["steps"] == 2 and manifest["config"]["lora"]["enabled"]
    trainer.close()


def test_native_engine_decodes_a_peft_model_with_its_adapters(tok):
    """The decode plan reads weights directly; a LoRA layer's ``weight`` is its base weight alone, so the plan must
    apply the adapters itself, as the prefill's forward does (it did not: a peft policy given to ``GrpoTrainer``
    decoded every token after the first without its adapters)."""
    from peft import LoraConfig, get_peft_model

    targets = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(_policy(tok), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    prompts = [tok.encode(r["prompt"]) for r in ROWS[:5]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    ours = NativeEngine(peft_model.get_base_model().eval()).generate(prompts, params)
    theirs = NativeEngine(copy.deepcopy(peft_model).merge_and_unload().eval()).generate(prompts, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5


def test_checkpoint_state_is_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    assert checkpoint_state(model).keys() == plain.keys()
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for source in (peft_model, peft_model.get_base_model()):
        ours = checkpoint_state(source)
        assert ours.keys() == want.keys()
        assert all(torch.allclose(ours[k], want[k], atol=1e-6) for k in want)
    assert any(not torch.allclose(want[k], plain[k]) for k in want)  # the adapters are not zero
    with peft_model.disable_adapter():
        off = checkpoint_state(peft_model)
    assert all(torch.equal(off[k], plain[k]) for k in plain)


# ---------------------------------------------------------------------------------------------------------------
# model.moe_aux_loss
# ---------------------------------------------------------------------------------------------------------------
def _qwen2_moe(tok):
    """transformers' Qwen2-MoE, which counts its experts as ``num_experts`` (the in-tree models: ``num_local_experts``)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None))


@pytest.mark.parametrize("family", ["hybrid", "qwen2_moe"])
def test_moe_aux_loss_trains_the_routers(tmp_path, tok, family):
    routers, logged = {}, {}
    for aux in (True, False):
        config = _config(tmp_path / str(aux), model={"moe_aux_loss": aux}, run={"steps": 1})
        trainer = _trainer(config, tok, _policy(tok, "tiny-moe") if family == "hybrid" else _qwen2_moe(tok))
        metrics = trainer.step()
        logged[aux] = metrics.get("aux_loss")
        layer = trainer.core.model.layers[0]
        router = layer.block_sparse_moe.router.layer if family == "hybrid" else layer.mlp.gate
        routers[aux] = router.weight.detach().clone()
        trainer.close()
    assert logged[False] is None and logged[True] > 0
    assert not torch.allclose(routers[True], routers[False])  # the router loss moved the routers
