"""DAPO dynamic sampling in the GRPO loop: groups whose outcome is uniform are dropped, generation continues until
the batch is full or the round limit is hit, and the counts are logged (metrics and metrics.jsonl)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

from posttrain.grpo.config import (
    CheckpointConfig,
    DynamicSamplingConfig,
    GrpoConfig,
    LoggingConfig,
    OptimConfig,
    OverlongConfig,
    RolloutConfig,
    RunConfig,
)
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


def outcome(prompts, completions, kind, **_):
    """Uniform (1.0 for every completion) on rows of kind "solved", varied elsewhere."""
    return [1.0 if k == "solved" else float(len(c) % 2) for c, k in zip(completions, kind, strict=True)]


def digits(prompts, completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


@pytest.fixture(scope="module")
def policy():
    return _small_policy()


def _config(tmp_path, max_rounds, overlong=0, steps=1):
    return GrpoConfig(
        rollout=RolloutConfig(prompts_per_step=4, num_generations=4, max_new_tokens=5),
        dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rounds=max_rounds, metric="outcome"),
        overlong=OverlongConfig(buffer=overlong), rewards=RewardsConfig(num_workers=0),
        optim=OptimConfig(lr=1e-3, mini_batches=2),
        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
        run=RunConfig(steps=steps, seed=1), logging=LoggingConfig(progress=False))


def _rows(kinds):
    return [{"prompt": f"{i}+{i}=", "kind": k} for i, k in enumerate(kinds)]


def test_uniform_groups_dropped_until_the_batch_is_full(policy, tmp_path):
    model, tok = policy
    kinds = ["solved", "open"] * 6  # 12 prompts, half of them give uniform groups
    trainer = GrpoTrainer(_config(tmp_path, max_rounds=10), model=model, tokenizer=tok, rows=_rows(kinds),
                          reward_set=RewardSet([WeightedReward("outcome", outcome)]))
    history = trainer.train()
    m = history[-1]
    seen = m["dynamic_sampling/generated_groups"]
    assert m["dynamic_sampling/kept_groups"] == 4  # the batch is full
    assert m["dynamic_sampling/rounds"] >= 2 and seen == 4 * m["dynamic_sampling/rounds"]
    # each dropped group is a "solved" prompt: count them from the sampler's order
    assert m["dynamic_sampling/dropped_groups"] >= 2
    assert {trainer.collector.rows[r.prompt_index]["kind"] for r in trainer.last_batch} == {"open"}
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["dynamic_sampling/dropped_groups"] == m["dynamic_sampling/dropped_groups"]
    assert logged[-1]["optim/updates"] == 2  # two mini-batches: two optimizer steps on one generation batch


def test_round_limit_and_shaping_does_not_hide_a_uniform_outcome(policy, tmp_path, caplog):
    model, tok = policy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # every group's outcome is uniform; a shaping reward makes the totals vary, and still every group is dropped:
    # the decision reads the outcome, not the shaped total. Overlong shaping (buffer 4 of 5 tokens) is added too.
    shaping = RewardSet([WeightedReward("outcome", outcome), WeightedReward("shape", digits, 0.1)])
    trainer = GrpoTrainer(_config(tmp_path, max_rounds=2, overlong=4), model=model, tokenizer=tok,
                          rows=_rows(["solved"] * 8), reward_set=shaping)
    with caplog.at_level(logging.WARNING):
        m = trainer.step()
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/generated_groups"] == 8
    assert m["dynamic_sampling/dropped_groups"] == 8 and m["dynamic_sampling/kept_groups"] == 0
    assert m["rewards/shape/std"] > 0  # the shaped total did vary
    # every completion has 1..5 tokens, inside the penalty band [5 - 4, 5]: penalty (1 - L) / 4, linear in L
    assert m["rewards/overlong/mean"] == pytest.approx((1 - m["completions/mean_length"]) / 4)
    assert m["optim/updates"] == 0 and "0 of 4 groups after 2 generation rounds" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    config = _config(tmp_path, max_rounds=2)
    config.dynamic_sampling.metric = "accuracy"
    with pytest.raises(ValueError, match="dynamic_sampling.metric 'accuracy' is not the label of a reward"):
        GrpoTrainer(config, model=model, tokenizer=tok, rows=_rows(["solved"]),
                    reward_set=RewardSet([WeightedReward("outcome", outcome)]))


def math_like(prompts, completions, kind, **_):
    """A verifier that does not apply to tool prompts (None there) and is uniform on "solved" prompts."""
    return [None if k == "tool" else 1.0 for k in kind]


def tool_like(prompts, completions, kind, **_):
    """A checker that applies only to tool prompts, with varied outcomes there."""
    return [float(len(c) % 2) if k == "tool" else None for c, k in zip(completions, kind, strict=True)]


def test_outcome_is_each_samples_first_applicable_reward(policy, tmp_path):
    # a mix of tasks, each scored by its own reward: with no metric configured, a tool prompt's outcome is the tool
    # checker's value (the math verifier says None there), so its varied groups are kept, not dropped as uniform
    model, tok = policy
    config = _config(tmp_path, max_rounds=10)
    config.dynamic_sampling.metric = None
    mixed = RewardSet([WeightedReward("math", math_like), WeightedReward("tool", tool_like)])
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=_rows(["solved", "tool"] * 6), reward_set=mixed)
    m = trainer.step()
    assert m["dynamic_sampling/kept_groups"] == 4 and m["dynamic_sampling/dropped_groups"] >= 2
    assert {trainer.collector.rows[r.prompt_index]["kind"] for r in trainer.last_batch} == {"tool"}
    assert all(r.rewards["math"] is None and trainer.collector.outcome(r) == r.rewards["tool"]
               for r in trainer.last_batch)
    assert len({trainer.collector.outcome(r) for r in trainer.last_batch}) == 2


def test_rewards_see_the_tool_call_markup_the_model_wrote(policy, tmp_path):
    # <tool_call> tags are special tokens: dropping them would merge two calls into text no parser reads as two
    from posttrain.rewards.tool_call import parse_tool_calls

    model, tok = policy
    trainer = GrpoTrainer(_config(tmp_path, max_rounds=1), model=model, tokenizer=tok, rows=_rows(["open"]),
                          reward_set=RewardSet([WeightedReward("outcome", outcome)]))
    written = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
               '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')
    ids = tok(written, add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    text = trainer.collector.completion_for_reward({"prompt": "1+2="}, ids)
    assert text == tok.decode(ids[:-2], skip_special_tokens=False) and text.count("<tool_call>") == 2
    assert [c["arguments"] for c in parse_tool_calls(text)] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    chat = trainer.collector.completion_for_reward({"prompt": [{"role": "user", "content": "1+2="}]}, ids)
    assert chat == [{"role": "assistant", "content": text}]
