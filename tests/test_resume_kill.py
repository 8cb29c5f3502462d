"""Exact resume: a real ``posttrain sft`` subprocess is SIGKILLed mid-run, restarted, and its loss curve, the samples
of every step and the final weights equal those of an uninterrupted run (float32 on CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer
from posttrain.train.checkpointing import CheckpointManager

STEPS, EVERY = 8, 2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    build_tokenizer(arithmetic_corpus(300), vocab_size=300).save_pretrained(str(root / "tok"))
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(40):
            p = arithmetic_problem(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": p["question"]},
                                             {"role": "assistant", "content": p["answer"]}]}) + "\n")
    path = root / "sft.yaml"
    path.write_text(
        f"model: {{preset: tiny, tokenizer: {root / 'tok'}}}\n"
        f"data: {{train_files: [{root / 'train.jsonl'}], max_length: 64, packing: true}}\n"
        f"optim: {{lr: 3.0e-3, per_device_batch_size: 2, max_steps: {STEPS}, warmup_steps: 2}}\n"
        f"checkpoint: {{output_dir: {root / 'unused'}, every_steps: {EVERY}, keep_last: 2}}\n"
        "logging: {progress: false, record_samples: true}\n")
    return path


def command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "sft", "--config", str(recipe), "--checkpoint.output_dir", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_resume_continues_the_loss_curve_exactly(recipe, tmp_path):
    from posttrain.config import load_config
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import run_training

    straight = tmp_path / "straight"  # the uninterrupted run, in this process (same code, no start-up cost)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(load_config(TrainConfig, recipe, ["--checkpoint.output_dir", str(straight)]), "sft")
    finally:
        torch.set_num_threads(threads)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(recipe, killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / f"step-{2 * EVERY:08d}" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    logged = [m["step"] for m in read_metrics(killed)]
    assert 2 * EVERY <= max(logged) < STEPS

    resumed = subprocess.run(command(recipe, killed), env=ENV, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout

    a, b = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))  # lines past the checkpoint were cut, none doubled
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
        assert y["samples"] == x["samples"], x["step"]  # same samples at every step: none twice, none skipped
    seen = [s for m in b for s in m["samples"]]
    assert len(seen) == len(set(seen))  # 8 steps of 2 packed bins stay inside the first epoch
    wa = load_file(str(straight / "final" / "model.safetensors"))
    wb = load_file(str(killed / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)


def test_a_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    manager = CheckpointManager(acc, tmp_path / "ck", keep_last=2)
    manager.save(2, {"position": 2})
    saved = model.weight.detach().clone()
    (tmp_path / "ck" / ".step-00000004.tmp").mkdir()  # what a kill during a save leaves behind
    (tmp_path / "ck" / "step-00000006").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert manager.latest().name == "step-00000002"
    with torch.no_grad():
        model.weight.add_(1.0)
    assert manager.resume()["position"] == 2
    assert torch.equal(model.weight.detach(), saved)
    manager.save(8, {"position": 8})
    manager.save(10, {"position": 10})
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step-00000006", "step-00000008", "step-00000010"]
