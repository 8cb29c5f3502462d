"""GRPO's server mode on two GPUs: ``posttrain vllm-serve`` (vLLM) on GPU 1, the trainer on GPU 0, weights by NCCL.

Checks: the server samples what the trainer's weights say after each NCCL broadcast (its greedy completions follow
a weight change exactly as the trainer's own native engine does); a short GRPO run with ``rollout.engine: server``
takes its steps with the weight version advancing once per step; a server killed mid-run gives the trainer a clear
error within ``rollout.sync_timeout_s``. Needs 2+ CUDA devices and vLLM; skipped, with the reason, otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA devices (server mode: one for vLLM)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install 'posttrain[vllm]'"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    from posttrain.synthetic import tiny_model

    tok, model = tiny_model(steps=30)
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    tok.save_pretrained(str(folder))
    port = _free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "vllm-serve", "--engine", "vllm", "--model",
                             str(folder), "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization",
                             "0.3", "--max-model-len", "512"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm-serve exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    yield url, tok, model.cuda().float(), proc
    proc.kill()
    proc.wait()


def test_nccl_sync_moves_the_server_to_the_trainer_weights(server):
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.native import NativeEngine
    from posttrain.rollout.remote import RemoteEngine
    from posttrain.rollout.weight_sync import SyncGroupConfig

    url, tok, model, _ = server
    remote = RemoteEngine(url)
    remote.init_weight_sync(SyncGroupConfig(port=_free_port(), backend="nccl", timeout_s=120))
    prompts = [tok.encode("Question: Ada has 3 apples and gets 4 more. How many apples does Ada have?\nAnswer:")]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, eos_token_id=tok.eos_token_id)
    remote.sync_weights(model)
    assert [c.token_ids for c in remote.generate(prompts, greedy)] == \
        [c.token_ids for c in NativeEngine(model).generate(prompts, greedy)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    remote.sync_weights(model)
    assert remote.health()["weights_version"] == 2
    assert [c.token_ids for c in remote.generate(prompts, greedy)] == \
        [c.token_ids for c in NativeEngine(model).generate(prompts, greedy)]


def test_grpo_steps_in_server_mode_and_a_dead_server_is_a_clear_error(server, tmp_path):
    from posttrain.rewards import RewardsConfig, RewardSpec

    from posttrain.grpo.config import CheckpointConfig, GrpoConfig, LoggingConfig, OptimConfig, RolloutConfig, RunConfig
    from posttrain.rollout.weight_sync import WeightSyncError

    url, tok, model, proc = server
    rows = [{"prompt": f"Question: Ada has {a} apples and gets {b} more. How many apples does Ada have?\nAnswer:",
             "answer": str(a + b)} for a in range(10) for b in range(10)]
    config = GrpoConfig(
        rollout=RolloutConfig(engine="server", server_url=url, sync_port=_free_port(), sync_backend="nccl",
                              sync_timeout_s=30, prompts_per_step=4, num_generations=4, max_new_tokens=24),
        rewards=RewardsConfig([RewardSpec("math")], num_workers=0), optim=OptimConfig(lr=1e-5),
        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
        run=RunConfig(steps=2), logging=LoggingConfig(progress=False))
    from posttrain.grpo.trainer import GrpoTrainer

    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows)
    start = trainer.engine.health()["weights_version"]
    for _ in range(2):
        trainer.step()
    assert trainer.engine.health()["weights_version"] == start + 2
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with pytest.raises((WeightSyncError, RuntimeError)):
        trainer.step()
    assert time.monotonic() - t0 < 30 + 30
