"""The GRPO loop's contract: old log-probs from packed rows agree with the engine's, several optimizer steps per
generation batch, non-finite steps skipped with the weights untouched, long prompts refused or dropped, exact
resume from a checkpoint, the recipe and the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

from posttrain.config import ConfigError, load_config
from posttrain.grpo.config import CheckpointConfig, GrpoConfig, LoggingConfig, OptimConfig, RolloutConfig, RunConfig
from posttrain.grpo.data import PromptDataError, PromptSampler, load_prompt_rows, pack_micro_batches
from posttrain.grpo.trainer import GrpoTrainer


def _small_policy():
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], vocab_size=64)
    config = preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None, hidden_size=64, mamba_n_heads=4,
                    mamba_d_head=32, mamba_d_state=16, shared_intermediate_size=128, num_hidden_layers=4,
                    layer_types=["mamba", "mamba", "attention", "mamba"], mamba_chunk_size=16)
    torch.manual_seed(0)
    return HybridForCausalLM(config), tokenizer


def digits_reward(prompts, completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(4)]


def _config(tmp_path, **run):
    return GrpoConfig(rollout=RolloutConfig(prompts_per_step=2, num_generations=4, max_new_tokens=5),
                      optim=OptimConfig(lr=5e-3, mini_batches=2, micro_batch_tokens=64),
                      rewards=RewardsConfig(num_workers=0),
                      checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
                      run=RunConfig(seed=2, **run), logging=LoggingConfig(progress=False))


def _trainer(tmp_path, model=None, tok=None, **run):
    if model is None:
        model, tok = _small_policy()
    return GrpoTrainer(_config(tmp_path, **run), model=model, tokenizer=tok, rows=ROWS,
                       reward_set=RewardSet([WeightedReward("digits", digits_reward)]))


def test_step_metrics_and_packed_logprobs_match_the_engine(tmp_path):
    trainer = _trainer(tmp_path, steps=1)
    trainer.config.rollout.recompute_old_logprobs = True  # to compare the two paths
    m = trainer.step()
    # the old log-probs come from packed training rows (fused kernel); the engine's from prefill + decode
    assert m["rollout_correction/mismatch_abs_mean"] < 1e-4
    assert m["optim/updates"] == 2 and m["optim/skipped"] == 0  # > 1 optimizer step per generation batch
    assert m["micro_batches"] >= 2  # the 64-token budget splits a mini-batch into packed rows
    for key in ("rewards/digits/mean", "rewards/digits/std", "accuracy", "clip/low_frac", "clip/high_frac",
                "entropy", "completions/mean_length", "zero_variance_groups_frac", "time/generate_s",
                "time/reward_s", "time/train_s", "optim/grad_norm"):
        assert key in m, key
    assert m["entropy"] > 0 and 1 <= m["completions/mean_length"] <= 5
    assert len(trainer.last_batch) == 8
    groups = [trainer.last_batch[i:i + 4] for i in range(0, 8, 4)]
    for g in groups:  # advantages centred per group
        assert sum(r.advantage for r in g) == pytest.approx(0.0, abs=1e-6)


def test_non_finite_gradient_skips_the_step_and_keeps_the_weights(tmp_path, caplog):
    model, tok = _small_policy()
    trainer = _trainer(tmp_path, model, tok, steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = len(trainer.chassis.optimizer.state)

    def poison(t):
        next(p for p in t.core.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    trainer.before_optimizer_step = poison
    with caplog.at_level(logging.WARNING):
        m = trainer.step()
    assert m["optim/skipped"] == 2 and m["optim/updates"] == 0
    assert "optimizer step skipped" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(trainer.chassis.optimizer.state) == state_before == 0  # Adam's moments never saw the NaN
    trainer.before_optimizer_step = None
    assert trainer.step()["optim/updates"] == 2  # and training goes on


def test_long_prompts_error_naming_them_or_dropped(tmp_path):
    model, tok = _small_policy()
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "1+1=" * 40, "answer": "2"}) + "\n")
    config = _config(tmp_path, steps=1)
    config.data.path, config.data.max_prompt_tokens = str(data), 16
    with pytest.raises(PromptDataError, match=r"p\.jsonl:2: prompt of \d+ tokens is longer than"):
        GrpoTrainer(config, model=model, tokenizer=tok, reward_set=RewardSet([WeightedReward("d", digits_reward)]))
    config.data.long_prompts = "drop"
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, reward_set=RewardSet([WeightedReward("d", digits_reward)]))
    assert trainer.collector.dropped_long_prompts == 1 and len(trainer.collector.rows) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompt_rows(bad)


def test_exact_resume(tmp_path):
    straight = _trainer(tmp_path / "a", steps=3)
    straight.train()
    first = _trainer(tmp_path / "b", steps=3)
    first.config.run.steps = 1
    first.train()  # stops after one step, with a checkpoint
    resumed = _trainer(tmp_path / "b", steps=3, resume="latest")
    assert resumed.step_count == 1
    resumed.train()
    a, b = straight.core.state_dict(), resumed.core.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["rewards/digits/mean"] for h in straight.history] == [h["rewards/digits/mean"] for h in resumed.history]
    assert (tmp_path / "b" / "checkpoints" / "step-00000003").is_dir()
    assert any((tmp_path / "b" / "final").glob("*.safetensors")) and (tmp_path / "b" / "final" / "config.json").exists()


def test_record_samples_logs_each_steps_prompts(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.config.logging.record_samples = True
    trainer.config.dynamic_sampling.enabled = False  # one generation round per step: the sampler's next two prompts
    trainer.train()
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    order = PromptSampler(len(ROWS), seed=2)
    assert [m["samples"] for m in logged] == [sorted(order.take(2)), sorted(order.take(2))]


def test_packing_and_sampler():
    rows = pack_micro_batches([5, 3, 9, 2, 2, 12], budget=10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths = [5, 3, 9, 2, 2, 12]
    assert all(sum(lengths[i] for i in r) <= 10 or len(r) == 1 for r in rows)
    assert len(rows) == 4  # 12 | 9 | 5+3+2 | 2 ... first-fit decreasing
    s = PromptSampler(5, seed=1)
    first = s.take(7)
    assert sorted(first[:5]) == list(range(5))
    state = s.state_dict()
    nxt = s.take(4)
    s2 = PromptSampler(5, seed=1)
    s2.load_state_dict(state)
    assert s2.take(4) == nxt


def test_recipe_loads_and_bad_fields_name_themselves():
    config = load_config(GrpoConfig, "recipes/grpo_dapo.yaml", ["--optim.lr", "3e-6", "--loss.type", "grpo"])
    assert config.optim.lr == 3e-6 and config.loss.type == "grpo" and config.loss.epsilon_high == 0.28
    assert config.optim.mini_batches > 1 and config.overlong.buffer > 0
    with pytest.raises(ConfigError, match="rollout.num_generation"):
        load_config(GrpoConfig, "recipes/grpo_dapo.yaml", ["--rollout.num_generation", "4"])
    with pytest.raises(ConfigError, match="loss.type"):
        load_config(GrpoConfig, None, ["--loss.type", "ppo"])


def test_cli_runs_a_step_from_files(tmp_path):
    from posttrain.cli import main

    model, tok = _small_policy()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rc = main(["grpo", "--config", "recipes/grpo_dapo.yaml", "--model.path", str(tmp_path / "m"),
               "--data.path", str(data), "--rollout.prompts_per_step", "2", "--rollout.num_generations", "2",
               "--rollout.max_new_tokens", "4", "--overlong.buffer", "2", "--rewards.num_workers", "1",
               "--run.steps", "1", "--checkpoint.output_dir", str(tmp_path / "run"), "--eval.path", str(data),
               "--eval.max_prompts", "4", "--logging.progress", "false"])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in lines[0] and "rewards/math/mean" in lines[-1] and "rewards/overlong/mean" in lines[-1]
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
    from posttrain.models.hybrid import HybridForCausalLM

    trained = HybridForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert trained.config.vocab_size == model.config.vocab_size


def test_vllm_engine_without_vllm_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and CUDA are here: tests/gpu/test_vllm_grpo.py runs the engine")
    from posttrain.rollout.vllm import VllmUnavailableError

    model, tok = _small_policy()
    config = _config(tmp_path, steps=1)
    config.rollout.engine = "vllm"
    with pytest.raises(VllmUnavailableError, match=r"rollout.engine: vllm needs"):
        GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS,
                    reward_set=RewardSet([WeightedReward("digits", digits_reward)]))


def test_grpo_kl_to_reference_and_masked_truncations(tmp_path):
    from posttrain.grpo.loss import LossConfig

    model, tok = _small_policy()
    config = _config(tmp_path, steps=1)
    config.loss = LossConfig("grpo", beta=0.1)
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS,
                          reward_set=RewardSet([WeightedReward("digits", digits_reward)]))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    m = trainer.step()
    # the first mini-batch sees policy == reference (k3 = 0); the second, after one update, a positive KL
    assert 0 < m["kl"] < 1
    config = _config(tmp_path / "mask", steps=1)
    config.loss = LossConfig("dapo", mask_truncated=True)
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS,
                          reward_set=RewardSet([WeightedReward("digits", digits_reward)]))
    trained = []
    trainer.update = lambda samples, stats: trained.extend(samples)
    trainer.step()
    assert all(s.finish_reason == "stop" for s in trained)
    assert len(trained) == sum(s.finish_reason == "stop" for s in trainer.last_batch) < len(trainer.last_batch)
