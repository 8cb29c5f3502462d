"""A GRPO step on the GPU as users run it: the native engine, bf16 autocast over float32 master weights, a KL reference
(``loss.beta > 0``), recomputed old log-probs and the rollout correction on (bfloat16 turns it on). Needs only torch
and CUDA; budgeted at well under 4 minutes on one H100 (a tiny hybrid, 3 steps). Checks that every tensor of the
update lives on the GPU (a step that mixed devices would raise), that the reference stays on the GPU and scores with
its own output layer (its log-probs equal the untouched starting policy's, recomputed here in float32), and prints
the step time and the logged mismatch.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu)"),
]


def digits_reward(prompts, completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def test_bf16_grpo_step_with_kl_reference_on_gpu(tmp_path):
    from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

    from posttrain.grpo.batch import RolloutBatch
    from posttrain.grpo.config import (
        CheckpointConfig,
        GrpoConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RolloutConfig,
        RunConfig,
    )
    from posttrain.grpo.loss import LossConfig
    from posttrain.grpo.trainer import GrpoTrainer
    from posttrain.synthetic import tiny_model

    tok, model = tiny_model(steps=30)
    start = copy.deepcopy(model).cuda().float().eval()
    model = model.cuda()  # float32 master weights: model.dtype bfloat16 is the autocast's
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    config = GrpoConfig(model=ModelConfig(dtype="bfloat16"),
                        rollout=RolloutConfig(prompts_per_step=8, num_generations=8, max_new_tokens=32),
                        optim=OptimConfig(lr=1e-4, mini_batches=2, micro_batch_tokens=2048),
                        loss=LossConfig("grpo", beta=0.04), rewards=RewardsConfig(num_workers=0),
                        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
                        run=RunConfig(steps=3, seed=0),
                        logging=LoggingConfig(progress=False))
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows,
                          reward_set=RewardSet([WeightedReward("digits", digits_reward)]))
    assert trainer.correction is not None and trainer.accelerator.mixed_precision == "bf16"
    assert trainer.core.dtype == torch.float32
    assert next(trainer.ref_model.parameters()).device.type == "cuda"
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert m["optim/skipped"] == 0 and math.isfinite(m["loss"]) and m["kl"] >= 0
    batch = RolloutBatch.build(trainer.last_batch, trainer.core.device)
    ref = batch.per_sample(trainer._frozen_logprobs(batch, "ref"))
    worst = 0.0
    for s, lp in zip(trainer.last_batch, ref, strict=True):
        with torch.no_grad():
            logits = start(torch.tensor([s.prompt_ids + s.completion_ids], device="cuda")).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(s.prompt_ids) - 1:-1].gather(
            -1, torch.tensor(s.completion_ids, device="cuda")[:, None])[:, 0]
        worst = max(worst, (lp.float() - expected).abs().mean().item())
    print(f"\nGRPO step (bf16, beta>0, correction on): {[round(t, 2) for t in times]} s; "
          f"mismatch |dlogp| {m['rollout_correction/mismatch_abs_mean']:.4f}, "
          f"correction weight mean {m['rollout_correction/weight_mean']:.4f}; ref vs float32 start {worst:.4f}")
    assert worst < 0.05  # bfloat16 reference against the float32 starting policy: rounding, not another head
    assert m["rollout_correction/mismatch_abs_mean"] < 0.1
