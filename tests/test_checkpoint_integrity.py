"""Checkpoint integrity: every checkpoint carries a manifest (size and sha256 of each file); resuming verifies it and
names the file that differs or is missing; ``resume: latest`` falls back to the newest valid checkpoint and says so;
``verify: size`` catches truncation but not a same-size change; a fresh run with ``resume: latest`` starts at 0
(SFT and GRPO); a checkpoint from before manifests is accepted with a warning. Real tiny models, real files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, load_config
from posttrain.synthetic import arithmetic_corpus, arithmetic_problem
from posttrain.tokenizer import build_tokenizer
from posttrain.train.checkpointing import MANIFEST_FILE, STATE_FILE, CheckpointError, CheckpointManager
from posttrain.train.config import TrainConfig

STEPS, EVERY = 6, 2


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores; one thread per process avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- damage, done the way a disk, a cut copy or a stray editor does it ------------------------------------------------
def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(ckpt: Path, kind: str) -> str:
    """Damage checkpoint folder ``ckpt``; returns the name of the file a clear error must name."""
    if kind == "flipped_byte":
        flip_byte(ckpt / "pytorch_model.bin")
        return "pytorch_model.bin"
    if kind == "truncated":
        truncate(ckpt / "optimizer.bin")
        return "optimizer.bin"
    if kind == "garbage_state":
        (ckpt / STATE_FILE).write_text("{ this is not json \x00\x01")
        return STATE_FILE
    if kind == "missing_file":
        (ckpt / "optimizer.bin").unlink()
        return "optimizer.bin"
    raise AssertionError(kind)


KINDS = ["flipped_byte", "truncated", "garbage_state", "missing_file"]


# -- the manager on a small module ------------------------------------------------------------------------------------
def linear_setup(folder: Path, verify: str = "full"):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return model, opt, CheckpointManager(acc, folder, keep_last=3, verify=verify)


def take_step(model, opt) -> None:
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    model, opt, manager = linear_setup(tmp_path / "ck")
    take_step(model, opt)
    ckpt = manager.save(1, {"position": 1})
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == on_disk and STATE_FILE in on_disk and "pytorch_model.bin" in on_disk
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert not list((tmp_path / "ck").glob(".*"))  # the temporary folder was renamed, nothing left over


def test_a_flipped_byte_in_the_weights_is_named_on_resume_and_nothing_is_loaded(tmp_path):
    model, opt, manager = linear_setup(tmp_path / "ck")
    take_step(model, opt)
    ckpt = manager.save(1, {"position": 1})
    weights = ckpt / "pytorch_model.bin"
    # flip a bit inside the weight tensor's own bytes: torch.load alone would return other numbers, silently
    raw = model.weight.detach().numpy().tobytes()
    at = weights.read_bytes().find(raw)
    assert at > 0
    flip_byte(weights, at + 2)
    silently_wrong = torch.load(weights, weights_only=True)["weight"]
    assert not torch.equal(silently_wrong, model.weight.detach())

    with torch.no_grad():
        model.weight.add_(1.0)
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError) as err:
        manager.resume(ckpt)  # an explicit path: that checkpoint or an error
    assert str(weights) in str(err.value) and "sha256" in str(err.value)
    assert torch.equal(model.weight.detach(), before)  # verified before anything was loaded
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):  # latest, and no older one to fall back to
        manager.resume("latest")
    assert ckpt.is_dir() and not list(ckpt.parent.glob("*.rejected"))  # an error moves nothing


@pytest.mark.parametrize("kind", KINDS)
def test_latest_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog, kind):
    model, opt, manager = linear_setup(tmp_path / "ck")
    take_step(model, opt)
    older = manager.save(1, {"position": 1})
    at_older = model.weight.detach().clone()
    take_step(model, opt)
    newer = manager.save(2, {"position": 2})
    name = damage(newer, kind)

    with caplog.at_level(logging.WARNING, logger="posttrain.train.checkpointing"):
        state = manager.resume("latest")
    assert state == {"position": 1, "step": 1}
    assert manager.resumed_from == older
    assert torch.equal(model.weight.detach(), at_older)
    said = caplog.text
    assert "step-00000002" in said and name in said and "step-00000001" in said
    assert not newer.exists() and (newer.parent / "step-00000002.rejected" / MANIFEST_FILE).is_file()  # kept aside
    # the run goes on: the next save of step 2 is whole again, and rotation keeps what it should
    manager.save(2, {"position": 2})
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002"]


def test_size_mode_catches_truncation_but_not_a_same_size_flip(tmp_path):
    model, opt, manager = linear_setup(tmp_path / "ck", verify="size")
    take_step(model, opt)
    ckpt = manager.save(1, {"position": 1})
    flip_byte(ckpt / "optimizer.bin")
    manager.verify(ckpt)  # documented: same size, other bytes, passes under "size"
    full = CheckpointManager(manager.accelerator, tmp_path / "ck", verify="full")
    with pytest.raises(CheckpointError, match="optimizer.bin"):
        full.verify(ckpt)
    truncate(ckpt / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"optimizer\.bin: \d+ bytes, the manifest says \d+"):
        manager.verify(ckpt)


def test_every_checkpoint_invalid_is_an_error_listing_each_and_moves_nothing(tmp_path):
    model, opt, manager = linear_setup(tmp_path / "ck")
    take_step(model, opt)
    a = manager.save(1, {"position": 1})
    b = manager.save(2, {"position": 2})
    damage(a, "truncated")
    damage(b, "garbage_state")
    with pytest.raises(CheckpointError) as err:
        manager.resume("latest")
    text = str(err.value)
    assert "step-00000001" in text and "step-00000002" in text and STATE_FILE in text and "optimizer.bin" in text
    assert a.is_dir() and b.is_dir()


def test_no_checkpoint_with_latest_is_a_fresh_start(tmp_path):
    _, _, manager = linear_setup(tmp_path / "nothing-here")
    assert manager.resume("latest") is None and manager.resumed_from is None
    assert manager.resume(True) is None
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        manager.resume(tmp_path / "nothing-here" / "step-00000004")


def test_a_checkpoint_from_before_manifests_is_accepted_with_a_warning(tmp_path, caplog):
    model, opt, manager = linear_setup(tmp_path / "ck")
    take_step(model, opt)
    ckpt = manager.save(1, {"position": 1})
    saved = model.weight.detach().clone()
    # what earlier versions wrote: no manifest, a trainer state without the marker
    (ckpt / MANIFEST_FILE).unlink()
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.pop("checkpoint_manifest")
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    with torch.no_grad():
        model.weight.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="posttrain.train.checkpointing"):
        assert manager.resume("latest") == {"position": 1, "step": 1}
    assert "cannot be verified" in caplog.text and "step-00000001" in caplog.text
    assert torch.equal(model.weight.detach(), saved)
    # ... but one written with a manifest that lost it is incomplete, and refused
    manager.save(2, {"position": 2})
    (tmp_path / "ck" / "step-00000002" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE}: missing"):
        manager.resume(tmp_path / "ck" / "step-00000002")


def test_a_legacy_checkpoint_that_cannot_be_loaded_is_named_not_a_bare_traceback(tmp_path):
    _, _, manager = linear_setup(tmp_path / "ck")
    ckpt = manager.save(1, {"position": 1})
    (ckpt / MANIFEST_FILE).unlink()
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.pop("checkpoint_manifest")
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    truncate(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{ckpt}: cannot be loaded"):
        manager.resume(ckpt)


def test_the_verify_setting_is_checked_naming_the_field():
    with pytest.raises(ConfigError, match=r"checkpoint\.verify"):
        load_config(TrainConfig, None, ["--checkpoint.verify", "fast"])
    assert load_config(TrainConfig, None, ["--checkpoint.verify", "size"]).checkpoint.verify == "size"
    assert load_config(TrainConfig, None, ["--run.resume", "latest"]).run.resume == "latest"
    from posttrain.dpo.config import DpoConfig
    from posttrain.grpo.config import GrpoConfig

    with pytest.raises(ConfigError, match=r"checkpoint\.verify"):
        load_config(DpoConfig, None, ["--checkpoint.verify", "sha1"])
    with pytest.raises(ConfigError, match=r"checkpoint\.verify"):
        load_config(GrpoConfig, None, ["--checkpoint.verify", "fast"])


# -- SFT end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
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
        f"checkpoint: {{output_dir: {root / 'unused'}, every_steps: {EVERY}, keep_last: 3}}\n"
        "logging: {progress: false}\nrun: {resume: latest}\n")
    return path


def sft(recipe: Path, out: Path, *overrides: str):
    from posttrain.train.run import run_training

    return run_training(load_config(TrainConfig, recipe, ["--checkpoint.output_dir", str(out), *overrides]), "sft")


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory) -> Path:
    """An uninterrupted run with checkpoints at steps 2, 4 and 6, started with ``resume: latest`` in an empty
    folder: the same command starts a job."""
    out = tmp_path_factory.mktemp("straight")
    result = sft(recipe, out)
    assert result.steps == STEPS
    assert sorted(losses(out)) == list(range(1, STEPS + 1))  # from step 1: nothing was resumed
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [f"step-{s:08d}" for s in (2, 4, 6)]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_sft_resumes_from_the_older_checkpoint_and_finishes_as_an_uninterrupted_run(recipe, straight, tmp_path,
                                                                                   capsys, caplog, kind):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")  # as if killed between steps 4 and 6
    name = damage(out / "checkpoints" / f"step-{4:08d}", kind)
    with caplog.at_level(logging.WARNING, logger="posttrain.train.checkpointing"):
        result = sft(recipe, out)
    assert result.steps == STEPS
    said = caplog.text
    assert "step-00000004" in said and name in said  # the bad checkpoint and why
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'} at step 2" in capsys.readouterr().out
    a, b = losses(straight), losses(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    wa = load_file(str(straight / "final" / "model.safetensors"))
    wb = load_file(str(out / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)
    assert (out / "checkpoints" / "step-00000004.rejected").is_dir()  # kept for a look, out of the way


def test_sft_cli_with_a_bad_checkpoint_path_stops_naming_the_file_and_writes_nothing(recipe, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    bad = out / "checkpoints" / f"step-{4:08d}"
    flip_byte(bad / "pytorch_model.bin")
    (out / "config.yaml").write_text("# the config of the run, as it was\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", "--config", str(recipe),
                           "--checkpoint.output_dir", str(out), "--run.resume", str(bad)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode != 0
    assert str(bad / "pytorch_model.bin") in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten, nothing added, nothing moved aside


# -- GRPO -------------------------------------------------------------------------------------------------------------
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(4)]


def digits_reward(prompts, completions, **_):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def grpo_trainer(out: Path, every_steps: int = 0, **run):
    from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

    from posttrain.grpo.config import CheckpointConfig, GrpoConfig, LoggingConfig, OptimConfig, RolloutConfig, RunConfig
    from posttrain.grpo.trainer import GrpoTrainer
    from posttrain.models.hybrid import HybridForCausalLM, preset

    tok = build_tokenizer([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], vocab_size=64)
    cfg = preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 bos_token_id=None, hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                 shared_intermediate_size=128, num_hidden_layers=2, layer_types=["mamba", "attention"],
                 mamba_chunk_size=16)
    torch.manual_seed(0)
    config = GrpoConfig(rollout=RolloutConfig(prompts_per_step=2, num_generations=2, max_new_tokens=4),
                        optim=OptimConfig(lr=5e-3, mini_batches=1, micro_batch_tokens=64),
                        rewards=RewardsConfig(num_workers=0),
                        checkpoint=CheckpointConfig(output_dir=str(out), every_steps=every_steps),
                        run=RunConfig(seed=2, **run), logging=LoggingConfig(progress=False))
    return GrpoTrainer(config, model=HybridForCausalLM(cfg), tokenizer=tok, rows=ROWS,
                       reward_set=RewardSet([WeightedReward("digits", digits_reward)]))


def test_grpo_latest_starts_fresh_then_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
    out = tmp_path / "grpo"
    first = grpo_trainer(out, every_steps=1, steps=2, resume="latest")  # no checkpoint yet: step 0, no error
    assert first.step_count == 0
    first.train()
    ckpts = out / "checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-00000001", "step-00000002"]
    assert all((p / MANIFEST_FILE).is_file() for p in ckpts.iterdir())
    damage(ckpts / "step-00000002", "flipped_byte")

    with pytest.raises(CheckpointError, match="pytorch_model.bin"):  # a path: that one or a clear error
        grpo_trainer(out, steps=2, resume=str(ckpts / "step-00000002"))
    assert (ckpts / "step-00000002").is_dir()

    with caplog.at_level(logging.WARNING, logger="posttrain.train.checkpointing"):
        resumed = grpo_trainer(out, steps=2, resume="latest")
    assert resumed.step_count == 1 and len(resumed.history) == 1
    assert "step-00000002" in caplog.text and "pytorch_model.bin" in caplog.text
    saved = torch.load(ckpts / "step-00000001" / "pytorch_model.bin", weights_only=True)
    now = resumed.core.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def test_two_processes_fall_back_together_past_a_damaged_checkpoint(recipe, tmp_path):
    """Under ``accelerate launch`` (2 CPU processes, gloo) the main process verifies and every process follows its
    verdict: both fall back to the same older checkpoint and finish with the weights of the first, whole run."""
    import socket

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "recipes" / "accelerate" / "cpu_2proc_gloo.yaml"), "--main_process_port", str(port),
              "-m", "posttrain.cli", "sft", "--config", str(recipe), "--checkpoint.output_dir", str(out),
              "--optim.max_steps", "4", "--optim.per_device_batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    whole = load_file(str(out / "final" / "model.safetensors"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    damage(out / "checkpoints" / "step-00000004", "flipped_byte")
    again = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'} at step 2" in again.stdout
    assert "step-00000004" in again.stderr and "pytorch_model.bin" in again.stderr
    resumed = load_file(str(out / "final" / "model.safetensors"))
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=0, msg=k)
