"""Distributed GRPO on the CPU: ``accelerate launch --num_processes 2`` gives the same advantages, loss and
first-step gradients as one process accumulating two or more micro-batches, same seed and global batch.

The layout (16 completions, G = 4, 4 mini-batches of 4, each split 2 + 2 across the processes) puts the
completions of every group on both processes, so the advantages must be computed over the whole group; the DAPO
token count must be global for the gradients to agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from accelerate import Accelerator
    from posttrain.grpo.config import (CheckpointConfig, GrpoConfig, RolloutConfig, DynamicSamplingConfig,
                                       OptimConfig, RunConfig, LoggingConfig, ModelConfig, DataConfig)
    from posttrain.grpo.loss import LossConfig
    from posttrain.grpo.trainer import GrpoTrainer
    from posttrain.rewards import RewardSet, RewardsConfig, WeightedReward

    def length_reward(prompts, completions, **_):
        return [float(len(c) % 5) for c in completions]

    model_dir, data, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    config = GrpoConfig(
        model=ModelConfig(path=model_dir), data=DataConfig(path=data, shuffle=True),
        rollout=RolloutConfig(prompts_per_step=4, num_generations=4, max_new_tokens=6, prompts_per_call=2),
        dynamic_sampling=DynamicSamplingConfig(max_rounds=2), loss=LossConfig("dapo"), rewards=RewardsConfig(num_workers=0),
        optim=OptimConfig(lr=1e-2, mini_batches=4, micro_batch_tokens=budget, max_grad_norm=None),
        checkpoint=CheckpointConfig(output_dir=out),
        run=RunConfig(steps=1, seed=3), logging=LoggingConfig(progress=False))
    acc = Accelerator(cpu=True)
    assert acc.num_processes == int(sys.argv[5]), acc.state
    trainer = GrpoTrainer(config, reward_set=RewardSet([WeightedReward("length", length_reward)]), accelerator=acc)
    grads = {}
    def capture(t):
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in t.core.named_parameters() if p.grad is not None})
    trainer.before_optimizer_step = capture
    metrics = trainer.step()
    if acc.is_main_process:
        torch.save(grads, out + "/grads.pt")
        samples = [dict(ids=s.completion_ids, adv=s.advantage) for s in trainer.last_batch]
        json.dump(dict(metrics=metrics, samples=samples), open(out + "/result.json", "w"))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None  # before exit: gloo
''')


def _small_policy(folder: Path) -> None:
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    texts = [f"{a}+{b}={a + b}" for a in range(20) for b in range(20)]
    tokenizer = build_tokenizer(texts, vocab_size=64)
    config = preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None, hidden_size=64, mamba_n_heads=4,
                    mamba_d_head=32, mamba_d_state=16, shared_intermediate_size=128, num_hidden_layers=4,
                    layer_types=["mamba", "mamba", "attention", "mamba"], mamba_chunk_size=16)
    torch.manual_seed(0)
    HybridForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


def _run(cmd: list[str], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate's launcher is not installed")
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    model_dir = tmp_path / "model"
    _small_policy(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(5)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # one process: a 20-token budget splits each 4-completion mini-batch into several packed micro-batches
    _run([sys.executable, str(worker), str(model_dir), str(data), str(one), "20", "1"], tmp_path)
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    # --multi_gpu with no GPU and Accelerator(cpu=True): two processes in one gloo group (``--cpu`` alone starts one)
    _run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "29533", str(worker), str(model_dir), str(data),
          str(two), "100000", "2"], tmp_path)
    a = json.loads((one / "result.json").read_text())
    b = json.loads((two / "result.json").read_text())
    assert [s["ids"] for s in a["samples"]] == [s["ids"] for s in b["samples"]]  # the same rollouts
    assert len(a["samples"]) == 16
    adv_a = [s["adv"] for s in a["samples"]]
    assert adv_a == pytest.approx([s["adv"] for s in b["samples"]], abs=1e-9)
    assert any(abs(x) > 0.1 for x in adv_a)
    assert a["metrics"]["micro_batches"] >= 8  # one process accumulates >= 2 micro-batches per optimizer step
    assert b["metrics"]["micro_batches"] == 8  # two processes: one packed row each per optimizer step
    assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-4, abs=1e-6)
    ga, gb = torch.load(one / "grads.pt"), torch.load(two / "grads.pt")
    assert ga.keys() == gb.keys() and len(ga) > 10
    total = torch.cat([g.flatten() for g in ga.values()]).norm()
    assert total > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6 * float(total), msg=name)
