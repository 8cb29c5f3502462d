"""The command line explains itself: ``--help`` lists every config field (dotted name, type, default, the doc written
where it is declared), ``--print-config`` prints the resolved recipe, non-finite numbers are refused naming the
field, and bad input (missing model, data, tokenizer, tracker package or folder) is one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.grpo.config import GrpoConfig
from posttrain.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _entry(text: str, field: str) -> list[str]:
    """The help lines of one field: its own line and the doc lines indented below it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  --{field} "))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("      "):
            break
        entry.append(line)
    return entry


def test_sft_help_lists_every_field_with_type_default_and_doc(capsys):
    text = _help("sft", capsys)
    fields = _dotted_fields(TrainConfig)
    assert len(fields) > 40
    for field in fields:
        entry = _entry(text, field)
        assert "(default: " in entry[0], field
    # the comments written beside the fields in posttrain/train/config.py, and the defaults of TrainConfig
    assert _entry(text, "optim.lr") == ["  --optim.lr float  (default: 2.0e-05)", "      peak learning rate"]
    assert _entry(text, "data.format")[0] == "  --data.format auto|messages|prompt_completion|text  (default: auto)"
    assert _entry(text, "model.preset")[0] == "  --model.preset str | None  (default: tiny)"  # TrainConfig's own
    assert "tokenizer folder; default: the model folder" in " ".join(_entry(text, "model.tokenizer"))
    undocumented = [f for f in fields if len(_entry(text, f)) == 1 and f not in ("stages",)]
    assert undocumented == [], undocumented


def test_grpo_help_lists_every_field_from_the_class_docstrings(capsys):
    text = _help("grpo", capsys)
    for field in _dotted_fields(GrpoConfig):
        assert f"  --{field} " in text, field
    assert _entry(text, "rollout.num_generations") == [
        "  --rollout.num_generations int  (default: 8)", "      G, completions sampled per prompt."]
    assert _entry(text, "rewards.timeout_s")[1].strip().startswith("time limit of one reward on one sample")
    assert "      - weight float  (default: 1.0)" in text  # the fields of each rewards.rewards item
    assert text.index("--config") < text.index("--model.path")


def test_print_config_shows_the_resolved_recipe(capsys):
    rc = main(["grpo", "--config", str(REPO / "recipes/grpo_dapo.yaml"), "--print-config", "--optim.lr", "3e-6",
               "--rollout.num_generations=5"])
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    recipe = yaml.safe_load((REPO / "recipes/grpo_dapo.yaml").read_text())
    assert printed["optim"]["lr"] == 3e-6 and printed["rollout"]["num_generations"] == 5
    for group, values in recipe.items():  # everything else as the recipe says
        for key, value in (values or {}).items():
            if (group, key) in (("optim", "lr"), ("rollout", "num_generations")):
                continue
            if isinstance(value, list) and value and isinstance(value[0], dict):  # records: the recipe's keys
                assert [{k: item[k] for k in v} for item, v in zip(printed[group][key], value, strict=True)] == value
            else:
                assert printed[group][key] == value, (group, key)
    assert printed["rewards"]["max_error_fraction"] == 0.0  # fields the recipe leaves out: their defaults


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "nan"])
def test_non_finite_numbers_name_the_field(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number"):
        load_config(TrainConfig, None, ["--optim.lr", raw])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"rollout:\n  temperature: {raw}\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: rollout\.temperature must be a finite number"):
        load_config(GrpoConfig, recipe)


@pytest.mark.parametrize(("field", "value", "why"), [("top_p", "0", r"top_p must be in \(0, 1\], got 0\.0"),
                                                    ("top_p", "1.5", r"top_p must be in \(0, 1\], got 1\.5"),
                                                    ("top_k", "-2", "top_k must be >= 0, got -2"),
                                                    ("max_new_tokens", "0", "max_new_tokens must be >= 1, got 0")])
def test_grpo_sampling_values_fail_when_the_recipe_loads(field, value, why):
    """A GRPO rollout's sampling values are checked with the recipe, before a model or an engine is built."""
    with pytest.raises(ConfigError, match=f"rollout: {why}"):
        load_config(GrpoConfig, None, [f"--rollout.{field}", value])


def test_print_config_of_a_bad_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: .nan\n")
    assert main(["sft", "--config", str(recipe), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"posttrain sft: {recipe}: optim.lr must be a finite number, got nan"


def _one_line_exit_2(argv: list[str], capsys, *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return data


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer([f"{a}+{b}={a + b}" for a in range(10) for b in range(10)], vocab_size=40)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    return tmp_path / "m"


def test_grpo_bad_inputs_are_one_line(tmp_path, capsys):
    data = _prompts(tmp_path)
    base = ["grpo", "--config", str(REPO / "recipes/grpo_dapo.yaml"), "--checkpoint.output_dir", str(tmp_path / "run"),
            "--eval.path", ""]
    _one_line_exit_2([*base, "--model.path", str(tmp_path / "nope"), "--data.path", str(data)], capsys,
                     "model.path", str(tmp_path / "nope"))
    model = _tiny_checkpoint(tmp_path)
    _one_line_exit_2([*base, "--model.path", str(model), "--data.path", str(tmp_path / "missing.jsonl")], capsys,
                     "data.path", "missing.jsonl")
    (tmp_path / "no_tok").mkdir()
    _one_line_exit_2([*base, "--model.path", str(model), "--data.path", str(data),
                      "--model.tokenizer", str(tmp_path / "no_tok")], capsys, "no tokenizer in", "no_tok")
    _one_line_exit_2([*base, "--model.path", str(model), "--data.path", str(data),
                      "--rewards.rewards", '[{"name": "no_such_reward"}]'], capsys, "no_such_reward")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        _one_line_exit_2([*base, "--model.path", str(model), "--data.path", str(data), "--logging.report_to",
                          "[wandb]"], capsys, "'wandb'", "not installed")
    assert not (tmp_path / "run" / "final").exists()


def test_sft_missing_tokenizer_and_model_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    base = ["sft", "--config", str(REPO / "recipes/sft_tiny.yaml"), "--checkpoint.output_dir", str(tmp_path / "o"),
            "--data.train_files", json.dumps([str(data)])]
    _one_line_exit_2([*base, "--model.tokenizer", str(tmp_path / "empty")], capsys,
                     "model.tokenizer", "no tokenizer in", str(tmp_path / "empty"))
    _one_line_exit_2([*base, "--model.path", str(tmp_path / "nope")], capsys, "model.path", str(tmp_path / "nope"))


def test_export_generate_key_into_a_missing_folder(tmp_path, capsys):
    key = tmp_path / "keys" / "signing.pem"
    _one_line_exit_2(["export", "--model", str(tmp_path), "--out", str(tmp_path / "out"), "--key", str(key),
                      "--generate-key"], capsys, str(tmp_path / "keys"), "does not exist")
    assert not key.parent.exists()


def test_export_missing_model_or_tokenizer(tmp_path, capsys):
    key = tmp_path / "k.pem"
    _one_line_exit_2(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--key", str(key),
                      "--generate-key"], capsys, "--model", str(tmp_path / "nope"))
    model = _tiny_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(["export", "--model", str(model), "--tokenizer", str(tmp_path / "empty"), "--out",
                      str(tmp_path / "out"), "--key", str(key)], capsys, "no tokenizer in", str(tmp_path / "empty"))
    assert not (tmp_path / "out").exists()
