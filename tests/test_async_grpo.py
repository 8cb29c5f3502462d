"""Asynchronous off-policy GRPO on the CPU: staleness 0 takes exactly the on-policy first update; staleness 1
generates ahead, logs each sample's staleness, keeps it bounded, and its importance ratio is against the policy
that generated the batch (so it is not 1 on the first pass, as it is on-policy)."""

from __future__ import annotations

import copy

import pytest
import torch
from posttrain.rewards import RewardSet, WeightedReward

from posttrain.grpo.config import (
    AsyncConfig,
    CheckpointConfig,
    DynamicSamplingConfig,
    GrpoConfig,
    LoggingConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
)
from posttrain.grpo.trainer import GrpoTrainer


def low_ids(prompts, completions, completion_ids, **_):
    """How many token ids below 128 a completion has: a reward that varies within the groups of a random model."""
    return [float(sum(t < 128 for t in ids)) for ids in completion_ids]


@pytest.fixture(scope="module")
def setup():
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer([f"{a}+{b}={a + b}" for a in range(50) for b in range(10)], vocab_size=64)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), hidden_size=32, mamba_n_heads=2, mamba_d_head=32,
                                     num_hidden_layers=2, layer_types=["mamba", "attention"],
                                     shared_intermediate_size=64, eos_token_id=tok.eos_token_id))
    rows = [{"prompt": f"{a}+{b}="} for a in range(50) for b in range(10)]
    return tok, model, rows


def _trainer(setup, tmp_path, name, enabled, staleness, steps=1, mini_batches=1, accelerator=None, every_steps=0,
             resume=None, dynamic_sampling=False):
    tok, model, rows = setup
    config = GrpoConfig(
        rollout=RolloutConfig(prompts_per_step=4, num_generations=4, max_new_tokens=6),
        dynamic_sampling=DynamicSamplingConfig(enabled=dynamic_sampling),
        optim=OptimConfig(lr=1e-2, mini_batches=mini_batches),
        async_rollout=AsyncConfig(enabled=enabled, max_staleness=staleness),
        checkpoint=CheckpointConfig(output_dir=str(tmp_path / name), every_steps=every_steps),
        run=RunConfig(steps=steps, seed=3, resume=resume),
        logging=LoggingConfig(progress=False),
    )
    return GrpoTrainer(config, model=copy.deepcopy(model), tokenizer=tok, rows=rows, accelerator=accelerator,
                       reward_set=RewardSet([WeightedReward("low_ids", low_ids, 1.0, in_process=True)]))


def test_staleness_zero_takes_the_on_policy_first_update(setup, tmp_path):
    # two mini-batches: both take their ratio against the sampler's log-probs (the native engine in float32),
    # the first optimizer step on-policy and the second one off by one update, as in the synchronous loop
    on = _trainer(setup, tmp_path, "on", enabled=False, staleness=0, mini_batches=2)
    off = _trainer(setup, tmp_path, "async", enabled=True, staleness=0, mini_batches=2)
    before = {n: p.detach().clone() for n, p in on.core.named_parameters()}
    m_on, m_off = on.step(), off.step()
    off.close()
    on.close()
    assert [r.completion_ids for r in on.last_batch] == [r.completion_ids for r in off.last_batch]
    assert m_off["async/staleness_max"] == 0.0 and m_off["optim/updates"] == m_on["optim/updates"] == 2
    moved = 0.0
    for (name, p_on), (_, p_off) in zip(on.core.named_parameters(), off.core.named_parameters(), strict=True):
        torch.testing.assert_close(p_off, p_on, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, float((p_on.detach() - before[name]).abs().max()))
    assert moved > 1e-4  # the update did something, so the comparison could fail
    assert m_on["loss"] == pytest.approx(m_off["loss"], abs=1e-6)


def test_one_step_off_policy_logs_bounded_staleness_and_ratios_against_the_generating_policy(setup, tmp_path):
    trainer = _trainer(setup, tmp_path, "stale", enabled=True, staleness=1, steps=4)
    history = trainer.train()
    stale = [h["async/staleness_max"] for h in history]
    assert stale[0] == 0.0  # the first batch can only come from the initial weights, which are the trained ones
    assert stale[1] == 1.0  # generated with version 0 while step 0 trained
    assert all(0.0 <= s <= 1.0 for s in stale)
    for h in history:
        assert h["async/staleness_min"] <= h["async/staleness_mean"] <= h["async/staleness_max"]
        assert (h["step"] - 1) - h["async/policy_version"] == h["async/staleness_max"]  # "step" counts done steps
    # first pass over a stale batch: the current policy differs from the generating one, so the ratio is not 1
    assert history[1]["ratio/log_abs_mean"] > 1e-4
    assert history[0]["ratio/log_abs_mean"] < 1e-5
    # per sample: every completion of the last batch carries the version that generated it
    assert {r.staleness for r in trainer.last_batch} == {int(stale[-1])}


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_resumed_run_equals_an_uninterrupted_one(setup, tmp_path, staleness):
    """A run stopped after its step-2 checkpoint and resumed takes the same steps as one that never stopped: the
    batches the producer had generated ahead, on policies older than the checkpoint's, are part of the checkpoint,
    and generation goes on from the prompts and sampling seeds where the producer was (dynamic sampling on, so a
    batch may take several generation rounds). (With max_staleness >= 2, which published version generates a batch
    depends on how fast the producer runs, so no two runs, resumed or not, need agree.)"""
    import json

    whole = _trainer(setup, tmp_path, "whole", True, staleness, steps=5, every_steps=2, dynamic_sampling=True)
    whole.train()
    _trainer(setup, tmp_path, "cut", True, staleness, steps=2, every_steps=2, dynamic_sampling=True).train()
    resumed = _trainer(setup, tmp_path, "cut", True, staleness, steps=5, every_steps=2, resume="latest",
                       dynamic_sampling=True)
    assert resumed.step_count == 2
    resumed.train()

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time") and k != "step_time_s"} for r in rows]

    assert [m["step"] for m in metrics("cut")] == [1, 2, 3, 4, 5]
    for a, b in zip(metrics("whole"), metrics("cut"), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    for (name, p), q in zip(whole.core.named_parameters(), resumed.core.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_a_checkpoint_of_the_other_mode_is_refused_before_anything_loads(setup, tmp_path):
    """A synchronous run's checkpoint has no batches generated ahead, an asynchronous one's does: resuming either in
    the other mode is a clear error naming the checkpoint and the field, and the checkpoint is left where it was."""
    for written in (False, True):
        name = f"written_async_{written}"
        _trainer(setup, tmp_path, name, written, 1, steps=1, every_steps=1).train()
        with pytest.raises(ValueError, match=rf"cannot resume from .*{name}/checkpoints/step-00000001: it was "
                                             rf"written with async_rollout\.enabled: {str(written).lower()}, this "
                                             rf"run has {str(not written).lower()}"):
            _trainer(setup, tmp_path, name, not written, 1, steps=2, resume="latest")
        assert [p.name for p in (tmp_path / name / "checkpoints").iterdir()] == ["step-00000001"]


def test_staleness_above_the_bound_is_refused():
    from posttrain.rollout.async_rollout import AsyncRollouts

    produced = []
    rollouts = AsyncRollouts(lambda index: produced.append(index) or len(produced), lambda sd: None, max_staleness=0)
    version, batch = rollouts.next_batch(0, timeout_s=30)
    assert (version, batch) == (0, 1)
    with pytest.raises(TimeoutError):  # step 1 cannot be generated before version 1 is published
        rollouts.next_batch(1, timeout_s=0.5)
    rollouts.publish(1, {})
    assert rollouts.next_batch(1, timeout_s=30) == (1, 2)
    rollouts.close()

    failing = AsyncRollouts(lambda index: 1 / 0, lambda sd: None, max_staleness=1)
    with pytest.raises(RuntimeError, match="producer failed"):
        failing.next_batch(0, timeout_s=30)
    failing.close()


def test_async_with_several_processes_is_refused_before_the_collector_starts(setup, tmp_path, monkeypatch):
    """The refusal comes before the rollout collector (and the reward pool it starts) exists: nothing is left
    running behind the error."""
    from accelerate import Accelerator

    import posttrain.grpo.trainer as trainer_module

    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(type(accelerator), "num_processes", property(lambda self: 2))

    def no_collector(*args, **kwargs):
        raise AssertionError("the rollout collector was built before the refusal")

    monkeypatch.setattr(trainer_module, "RolloutCollector", no_collector)
    with pytest.raises(ValueError, match="async_rollout.enabled supports one training process"):
        _trainer(setup, tmp_path, "refused", enabled=True, staleness=1, accelerator=accelerator)
