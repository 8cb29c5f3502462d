"""The distributed path is real: ``accelerate launch --num_processes 2`` on CPU (gloo) trains the tiny hybrid with the
same global batch as one process and gives the same loss curve; every accelerate recipe is a valid config."""

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

from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process(tmp_path):
    from posttrain.config import load_config
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import run_training

    build_tokenizer(arithmetic_corpus(300), vocab_size=300).save_pretrained(str(tmp_path / "tok"))
    rng = random.Random(0)
    rows = []
    for i in range(24):
        p = arithmetic_problem(rng)
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": p["question"]},
                                      {"role": "assistant", "content": p["answer"]}]})
        else:
            rows.append({"prompt": p["question"], "completion": " " + p["answer"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"model: {{preset: tiny, tokenizer: {tmp_path / 'tok'}}}\n"
        f"data: {{train_files: [{tmp_path / 'train.jsonl'}], max_length: 64, packing: false}}\n"
        "optim: {lr: 3.0e-3, per_device_batch_size: 2, max_steps: 4}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'two'}, every_steps: 0}}\n"
        "logging: {progress: false, record_samples: true}\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / "cpu_2proc_gloo.yaml"), "--main_process_port", str(free_port()),
              "-m", "posttrain.cli", "sft", "--config", str(recipe)]
    two = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, twice the per-device batch: the same global batch of 4 sequences
        run_training(load_config(TrainConfig, recipe, ["--optim.per_device_batch_size", "4",
                                                       "--checkpoint.output_dir", str(tmp_path / "one")]), "sft")
    finally:
        torch.set_num_threads(threads)
    curves = {}
    for name in ("one", "two"):
        curves[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples"] for m in curves["one"]] == [m["samples"] for m in curves["two"]]
    assert [m["target_tokens"] for m in curves["one"]] == [m["target_tokens"] for m in curves["two"]]
    for a, b in zip(curves["one"], curves["two"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
    assert curves["two"][-1]["loss"] < curves["two"][0]["loss"]
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_accelerate_recipes_are_valid_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    assert DistributedType(cfg.distributed_type)
    if cfg.distributed_type == DistributedType.FSDP:
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "HybridBlock"
        from posttrain.models.hybrid import modeling

        assert hasattr(modeling, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port
    assert RECIPES and any(p.stem == "cpu_2proc_gloo" for p in RECIPES)
