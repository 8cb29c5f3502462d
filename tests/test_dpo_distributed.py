"""``accelerate launch --num_processes 2`` on CPU (gloo) runs ``posttrain dpo`` and equals one process that takes
the same global batch in two accumulated micro-batches: the same pairs at every step, the same losses and metrics,
the same final weights."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    from posttrain.config import load_config
    from posttrain.dpo.config import DpoConfig
    from posttrain.dpo.run import run_dpo

    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    rng = random.Random(0)
    rows = []
    for _ in range(16):
        p = arithmetic_problem(rng)
        wrong = p["answer"].rsplit("#### ", 1)[0] + f"#### {rng.randint(100, 200)}"
        rows.append({"prompt": f"Question: {p['question']}\nAnswer:", "chosen": " " + p["answer"], "rejected": " " + wrong})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        f"model: {{path: {tmp_path / 'base'}}}\n"
        f"data: {{train_files: [{tmp_path / 'train.jsonl'}], eval_files: [{tmp_path / 'eval.jsonl'}], max_length: 96}}\n"
        "loss: {type: sigmoid, beta: 0.1, label_smoothing: 0.05}\n"
        "optim: {lr: 3.0e-3, per_device_batch_size: 2, max_steps: 3, schedule: constant}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'two'}, every_steps: 0}}\n"
        "eval: {batch_size: 2}\n"
        "logging: {progress: false, record_samples: true}\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / "cpu_2proc_gloo.yaml"), "--main_process_port", str(free_port()),
              "-m", "posttrain.cli", "dpo", "--config", str(recipe)]
    two = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout and "held-out reward accuracy" in two.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, two micro-batches of 2 pairs: the same global batch of 4 pairs
        run_dpo(load_config(DpoConfig, recipe, ["--optim.grad_accumulation_steps", "2",
                                                "--checkpoint.output_dir", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    curves = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("one", "two")}
    assert [m["step"] for m in curves["two"]] == [0, 1, 2, 3]
    assert [m.get("samples") for m in curves["one"]] == [m.get("samples") for m in curves["two"]]
    for a, b in zip(curves["one"], curves["two"]):
        for key in ("loss", "rewards/margin", "logps/chosen", "eval/loss", "eval/rewards/accuracy", "eval/logps/margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert curves["two"][-1]["loss"] < curves["two"][0 + 1]["loss"]
    wa, wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
