"""Each example in examples/ runs as a user would run it, shortened: the filter-then-SFT script on its sample data,
the Python API pipeline at a twentieth of its steps, and the reward plugin installed with pip and used by
name in a GRPO recipe (scored in the reward pool's worker processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def _env(**extra: str) -> dict[str, str]:
    """The test's environment with the interpreter's bin folder first on PATH (the `posttrain` command)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _small_model(folder: Path, texts: list[str]) -> Path:
    tokenizer = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                    mamba_n_heads=2, mamba_d_head=32, mamba_d_state=16, shared_intermediate_size=64,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    HybridForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_filter_then_sft_on_the_sample_data(tmp_path):
    example = EXAMPLES / "filter_then_sft"
    rows = [json.loads(line) for line in (example / "my_data.jsonl").read_text().splitlines()]
    model = _small_model(tmp_path / "model", [m["content"] for r in rows for m in r["messages"]])
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(example / "run.sh"), str(example / "my_data.jsonl"), str(model), str(out),
                           "--optim.max_steps", "2", "--logging.progress", "false"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    kept = [json.loads(line) for line in (out / "filtered" / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "filtered" / "rejected.jsonl").read_text().splitlines()]
    # the README's account of the sample: 3 wrong answers, 1 broken chat, 2 copies among 42 rows
    assert (len(kept), len(rejected)) == (36, 6)
    assert not any("#### 1000" in r["messages"][-1]["content"] for r in kept)
    assert all(r["messages"][0]["role"] == "user" for r in kept)
    assert len({json.dumps(r["messages"]) for r in kept}) == len(kept)
    metrics = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
    assert (out / "sft" / "final" / "model.safetensors").is_file()
    bad_usage = subprocess.run(["bash", str(example / "run.sh")], capture_output=True, text=True, env=_env(),
                               timeout=60, check=False)
    assert bad_usage.returncode == 2 and "usage:" in bad_usage.stderr


def test_python_api_pipeline_runs_every_stage(tmp_path):
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "python_api" / "pipeline.py"), "--out", str(out),
                           "--scale", "0.05"], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "signature valid" in proc.stdout
    manifest = json.loads((out / "filter" / "manifest.json").read_text())
    assert manifest
    kept = (out / "filter" / "kept.jsonl").read_text().splitlines()
    assert not any("#### 999" in line for line in kept), "answers that do not verify are filtered out"
    assert 150 <= len(kept) < 200
    for folder in ("pretrain/final", "sft/final", "grpo/final", "export"):
        assert (out / folder / "config.json").is_file(), folder
    grpo = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in grpo if "loss" in m]) == 2


def test_reward_plugin_installs_and_trains_by_name_in_a_recipe(tmp_path, shared_data):
    source = tmp_path / "plugin_src"
    shutil.copytree(EXAMPLES / "reward_plugin", source)  # pip builds in place: keep the checkout clean
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]})
            if len(rows) == 8:
                break
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = _small_model(tmp_path / "model", [r["prompt"][0]["content"] + " " + r["answer"] for r in rows])
    # the README's recipe snippet, in a GRPO recipe
    recipe = yaml.safe_load((REPO / "recipes" / "grpo_dapo.yaml").read_text())
    recipe["rewards"] = {"rewards": [{"name": "math", "weight": 1.0},
                                     {"name": "repetition", "weight": 0.1, "options": {"n": 2}}],
                         "num_workers": 1, "timeout_s": 30}
    recipe["model"]["path"] = str(model)
    recipe["data"]["path"] = str(prompts)
    recipe["rollout"].update(prompts_per_step=2, num_generations=4, max_new_tokens=12)
    recipe["overlong"]["buffer"] = 4
    recipe["eval"] = {"path": None}
    recipe["checkpoint"].update(output_dir=str(tmp_path / "grpo"), every_steps=0)
    recipe["run"].update(steps=1)
    recipe["logging"]["progress"] = False
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = _env(PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "grpo", "--config", str(path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rewards/repetition/mean" in metrics, sorted(metrics)
    assert -1.0 <= metrics["rewards/repetition/mean"] <= 0.0
    # without the plugin on the path the same recipe fails, naming the reward
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "grpo", "--config", str(path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode != 0 and "repetition" in proc.stdout + proc.stderr


@pytest.mark.parametrize("folder", sorted(p for p in EXAMPLES.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_every_example_has_a_readme_and_a_test(folder):
    assert (folder / "README.md").is_file()
    assert folder.name in {"filter_then_sft", "python_api", "reward_plugin"}, f"{folder}: add a test for it here"
