"""``posttrain pretrain`` end to end on plain text, the recipes in recipes/, tracker and data errors before any
training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main as cli
from posttrain.config import load_config
from posttrain.provenance import file_digest
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer
from posttrain.train.config import TrainConfig
from posttrain.train.schedules import lr_lambda

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture in conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    build_tokenizer(arithmetic_corpus(300), vocab_size=300).save_pretrained(str(root / "tok"))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in arithmetic_corpus(64, seed=5)))
    recipe = root / "pt.yaml"
    recipe.write_text(
        f"model: {{preset: tiny, tokenizer: {root / 'tok'}}}\n"
        f"data: {{train_files: [{root / 'text.jsonl'}], max_length: 256, packing: true}}\n"
        "optim: {lr: 3.0e-3, per_device_batch_size: 2, max_steps: 8, schedule: wsd, warmup_steps: 2, "
        "decay_fraction: 0.25}\n"
        f"checkpoint: {{output_dir: {root / 'run'}, every_steps: 4}}\n"
        "logging: {progress: true}\n")
    return root, recipe


@pytest.mark.parametrize("name", ["pretrain_tiny", "sft_tiny", "context_extension_tiny", "sft_granite_h_micro"])
def test_shipped_recipes_load(name):
    config = load_config(TrainConfig, ROOT / "recipes" / f"{name}.yaml")
    assert config.data.train_files and config.checkpoint.output_dir


def test_pretrain_from_a_preset_learns_and_records_provenance(setup, capsys):
    root, recipe = setup
    assert cli(["pretrain", "--config", str(recipe)]) == 0
    run = root / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    schedule = lr_lambda("wsd", 8, warmup_steps=2, decay_fraction=0.25)
    for m in metrics:  # the lr logged after step s is the one step s + 1 will use
        assert m["lr"] == pytest.approx(3e-3 * schedule(m["step"]))
    assert all(m["tokens_per_s"] > 0 and 0 < m["packing_efficiency"] <= 1 for m in metrics)
    assert sum(m["packing_efficiency"] for m in metrics) / len(metrics) > 0.7  # bins are mostly full
    manifest = json.loads((run / "final" / "training_manifest.json").read_text())
    assert manifest["data"][0]["sha256"] == file_digest(root / "text.jsonl")
    assert manifest["base"] == {"preset": "tiny", "seed": 0} and manifest["steps"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    from posttrain.models.hybrid import HybridForCausalLM

    assert HybridForCausalLM.from_pretrained(run / "final").config.vocab_size > 0


def test_missing_tracker_package_is_a_clear_error(setup, capsys):
    import accelerate.utils as au

    root, recipe = setup
    rc = cli(["pretrain", "--config", str(recipe), "--checkpoint.output_dir", str(root / "tb"),
              "--logging.report_to", "[tensorboard]", "--optim.max_steps", "1"])
    if au.is_tensorboard_available():
        assert rc == 0 and list((root / "tb").rglob("events.out.tfevents*"))
    else:
        assert rc == 2
        assert "pip install tensorboard" in capsys.readouterr().err
    assert cli(["pretrain", "--config", str(recipe), "--logging.report_to", "[nonsense]"]) == 2
    assert "unknown tracker 'nonsense'" in capsys.readouterr().err


def test_bad_rows_and_fields_fail_before_training(setup, tmp_path, capsys):
    _, recipe = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    rc = cli(["pretrain", "--config", str(recipe), "--data.train_files", f"[{bad}]", "--checkpoint.output_dir",
              str(tmp_path / "out")])
    assert rc == 2
    assert "bad.jsonl:2: field `text` must be a non-empty string" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli(["pretrain", "--config", str(recipe), "--optim.lr", "fast"]) == 2
    assert "optim.lr must be a number" in capsys.readouterr().err
    # a warmup longer than the whole run is a clear error naming the option, not a traceback
    rc = cli(["pretrain", "--config", str(recipe), "--optim.max_steps", "3", "--optim.warmup_steps", "5",
              "--checkpoint.output_dir", str(tmp_path / "warm")])
    assert rc == 2
    assert "optim: warmup_steps must be between 0 and the run's total steps (3), got 5" in capsys.readouterr().err


def test_resuming_with_another_global_batch_is_a_clear_error(setup, tmp_path, capsys):
    _, recipe = setup
    out = tmp_path / "run"
    common = ["pretrain", "--config", str(recipe), "--checkpoint.output_dir", str(out), "--optim.max_steps", "2",
              "--optim.warmup_steps", "0", "--checkpoint.every_steps", "1", "--logging.progress", "false"]
    assert cli(common) == 0
    # the checkpoint's step counts batches of 2: with batches of 4 it would index other samples
    assert cli([*common, "--optim.max_steps", "3", "--optim.per_device_batch_size", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "in global batches of 2, this run has" in err and "batches of 4" in err
    assert max(p.name for p in (out / "checkpoints").iterdir()) == "step-00000002"  # nothing overwritten
