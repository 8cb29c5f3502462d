"""Every recipe in recipes/ is checked: it loads into its command's config, and one step of it runs on a shrunken
model (the recipe's own model shape, narrowed) with small files made from the real data in ../shared/data.

``shrink_recipe`` is the one place that says what shrinking changes: the model (path or preset) and every path,
lengths, batch sizes and step counts, bf16 -> float32 (CPU), trackers off. Everything else (schedule, loss, rewards,
packing, LoRA, stages, rules, dedup) runs as the recipe says. A recipe of a kind this file does not know fails with a
message saying where to add it. The accelerate configs in recipes/accelerate/ go through accelerate's own parsing
and launch validation."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import COMMANDS
from posttrain.cli import main as cli_main
from posttrain.config import ConfigError, load_config
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.models.hybrid.presets import PRESETS
from posttrain.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
TRAINING_RECIPES = sorted(p for p in RECIPES.glob("*.yaml"))
FILTER_RECIPES = sorted((RECIPES / "filter").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))

# file-name prefix -> the posttrain command that runs the recipe
COMMAND_OF_PREFIX = {"pretrain": "pretrain", "context_extension": "pretrain", "sft": "sft", "grpo": "grpo",
                     "dpo": "dpo"}


def command_of(recipe: Path) -> str:
    for prefix, command in COMMAND_OF_PREFIX.items():
        if recipe.stem.startswith(prefix):
            return command
    raise AssertionError(f"{recipe}: no command known for this recipe's name; add its prefix to COMMAND_OF_PREFIX "
                         f"and its shrinking to shrink_recipe in tests/test_recipes.py")


def config_class(command: str):
    if command in ("pretrain", "sft"):
        from posttrain.train.config import TrainConfig

        return TrainConfig
    if command == "grpo":
        from posttrain.grpo.config import GrpoConfig

        return GrpoConfig
    if command == "dpo":
        from posttrain.dpo.config import DpoConfig

        return DpoConfig
    raise AssertionError(f"no config class known for command {command!r}")


# ------------------------------------------------------------------------------------------------ shrinking
def shrink_shape(name: str, vocab_size: int) -> dict:
    """The preset's shape, narrowed: same layer pattern and kinds (Mamba/attention, MoE or dense), tiny widths."""
    shape = dict(PRESETS[name])
    moe = shape.get("num_local_experts", 0) > 0
    shape.update(vocab_size=vocab_size, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                 mamba_n_heads=2, mamba_d_head=32, mamba_d_state=16, mamba_expand=2, mamba_chunk_size=32,
                 shared_intermediate_size=64, intermediate_size=32 if moe else 0,
                 num_local_experts=min(shape.get("num_local_experts", 0), 4),
                 num_experts_per_tok=min(shape.get("num_experts_per_tok", 1), 2))
    shape.pop("embedding_multiplier", None)
    shape.pop("logits_scaling", None)
    shape.pop("attention_multiplier", None)
    return shape


def preset_of(recipe: dict) -> str:
    """The shape a recipe trains: its preset, or the preset a model path is named after (``/models/granite-4.0-h-
    micro``), else the tiny one."""
    model = recipe.get("model", {})
    if model.get("preset"):
        return model["preset"]
    name = Path(str(model.get("path", ""))).name
    return name if name in PRESETS else "tiny"


def shrink_recipe(recipe: dict, command: str, env: dict) -> dict:
    """A copy of ``recipe`` that runs one step in seconds: see the module docstring for what changes."""
    r = copy.deepcopy(recipe)
    out = str(env["tmp"] / "run")
    model = r.setdefault("model", {})
    if command == "pretrain" and model.get("preset"):
        model["tokenizer"] = str(env["tokenizer"])
    else:
        model.pop("preset", None)
        model["path"] = str(env["checkpoint"](preset_of(recipe)))
    if model.get("dtype") == "bfloat16":
        model["dtype"] = "float32"
    data = r.setdefault("data", {})
    if command in ("pretrain", "sft", "dpo"):
        data["train_files"] = [str(env["files"][command if command != "pretrain" else "text"])]
        if command == "sft" and data.get("prompt_field", "prompt") != "prompt":  # GSM8K-style question/answer rows
            data["train_files"] = [str(env["files"]["gsm8k"])]
        cap = 512 if command == "dpo" else 128  # a preference row keeps its whole prompt (GSM8K: ~250 tokens here)
        data["max_length"] = min(int(data.get("max_length", cap)), cap)
        data["max_samples"] = 16
        if data.get("eval_files"):
            data["eval_files"] = [str(env["files"]["dpo"])]
        optim = r.setdefault("optim", {})
        optim.update(max_steps=1, per_device_batch_size=2, grad_accumulation_steps=1, warmup_steps=0)
        r.setdefault("checkpoint", {}).update(output_dir=out, every_steps=0)
        for stage in r.get("stages", []):
            stage.update(max_steps=1, max_length=min(stage.get("max_length", 128), 128))
    elif command == "grpo":
        data["path"] = str(env["files"]["grpo"])
        rollout = r.setdefault("rollout", {})
        rollout.update(prompts_per_step=2, num_generations=2, max_new_tokens=8, engine="native")
        overlong = r.get("overlong", {})
        if overlong.get("buffer"):
            overlong["buffer"] = 4
        r.setdefault("rewards", {})["num_workers"] = min(r["rewards"].get("num_workers", 0), 1)
        r.setdefault("optim", {})["mini_batches"] = min(r["optim"].get("mini_batches", 1), 4)
        r["eval"] = {**r.get("eval", {}), "path": str(env["files"]["grpo"]), "max_prompts": 2}
        r.setdefault("checkpoint", {}).update(output_dir=out, every_steps=0)
        r.setdefault("run", {}).update(steps=1)
    logging_ = r.setdefault("logging", {})
    logging_.update(report_to=[], progress=False)
    return r


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gsm8k(shared_data: Path, n: int) -> list[dict]:
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def _final_answer(answer: str) -> str:
    return answer.rsplit("####", 1)[-1].strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("recipes")
    rows = _gsm8k(shared_data, 32)
    tokenizer = build_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=300)
    tokenizer.save_pretrained(tmp / "tokenizer")

    def write(name: str, items: list[dict]) -> Path:
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(i) + "\n" for i in items))
        return path

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    chats = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in rows]
    chats.append({"messages": [{"role": "user", "content": "2+3 by tool"},
                               {"role": "assistant", "content": "", "tool_calls": [
                                   {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}],
                  "tools": tools})
    files = {
        "text": write("text", [{"text": r["answer"], "answer": r["answer"]} for r in rows]),
        "gsm8k": write("gsm8k", rows),
        "sft": write("chats", chats),
        "grpo": write("prompts", [{"prompt": [{"role": "user", "content": r["question"]}],
                                   "answer": _final_answer(r["answer"])} for r in rows]),
        "dpo": write("pairs", [{"prompt": [{"role": "user", "content": r["question"]}],
                                "chosen": [{"role": "assistant", "content": r["answer"]}],
                                "rejected": [{"role": "assistant", "content": f"#### {int(_final_answer(r['answer'])) + 1}"}]}
                               for r in rows if _final_answer(r["answer"]).lstrip("-").isdigit()]),
    }
    checkpoints: dict[str, Path] = {}

    def checkpoint(name: str) -> Path:
        if name not in checkpoints:
            folder = tmp / f"model-{name}"
            torch.manual_seed(0)
            config = preset(name, **{**shrink_shape(name, len(tokenizer)), "pad_token_id": tokenizer.pad_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None})
            HybridForCausalLM(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            checkpoints[name] = folder
        return checkpoints[name]

    # the shared fields in `env` are read-only; each test gets its own output folder through `tmp`
    return {"tokenizer": tmp / "tokenizer", "files": files, "checkpoint": checkpoint, "tmp": tmp}


# ------------------------------------------------------------------------------------------------ training recipes
def test_every_recipe_is_covered():
    names = {p.name for p in TRAINING_RECIPES}
    for expected in ("pretrain_tiny.yaml", "sft_tiny.yaml", "context_extension_tiny.yaml", "sft_granite_h_micro.yaml",
                     "grpo_dapo.yaml"):
        assert expected in names, expected
    assert {p.name for p in FILTER_RECIPES} >= {"math_verified.yaml", "sft_chat.yaml", "pairwise_preferences.yaml"}
    for recipe in TRAINING_RECIPES:
        command_of(recipe)  # every recipe has a command; a new kind fails here until this file knows it


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_validates_and_runs_one_step(recipe, env, tmp_path):
    command = command_of(recipe)
    assert command in COMMANDS, f"{recipe}: command {command!r} is not a posttrain command"
    cls = config_class(command)
    loaded = load_config(cls, recipe)  # as shipped: every field name and value is valid
    raw = yaml.safe_load(recipe.read_text())
    group, field_name = next((g, f) for g, v in raw.items() if isinstance(v, dict) for f in v)
    with pytest.raises(ConfigError, match=re.escape(f"{group}.{field_name}_misspelt")):
        load_config(cls, recipe, [f"--{group}.{field_name}_misspelt", "1"])
    assert loaded is not None

    env = dict(env, tmp=tmp_path)
    small = shrink_recipe(raw, command, env)
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(small, sort_keys=False))
    load_config(cls, path)
    code = cli_main([command, "--config", str(path)])
    assert code == 0, f"posttrain {command} --config {path} exited with {code}"

    run = tmp_path / "run"
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["model_type"] == "granitemoehybrid"
    reference = PRESETS[preset_of(raw)]
    assert config["layer_types"] == reference["layer_types"], "the shrunken model keeps the recipe's layer pattern"
    stages = raw.get("stages", [])
    logs = [run / f"stage-{i + 1}" / "metrics.jsonl" for i in range(len(stages))] or [run / "metrics.jsonl"]
    for log in logs:  # one optimizer step per run (per stage in a staged recipe), with a finite loss
        metrics = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
        assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0])), (log, metrics[-1:])
    if stages:  # each stage was merged with its starting point; the last merge is the final model
        assert (run / "final" / "merge_manifest.json").is_file()


# ------------------------------------------------------------------------------------------------ filter recipes
def _judge_server():
    from posttrain.judges.scripted_server import ScriptedJudgeServer

    return ScriptedJudgeServer()


@pytest.mark.parametrize("recipe", FILTER_RECIPES, ids=lambda p: p.stem)
def test_filter_recipe_loads_and_runs(recipe, shared_data, tmp_path):
    from posttrain.judges.config import load_config as load_filter_config

    raw = yaml.safe_load(recipe.read_text())
    load_filter_config(recipe, [])
    rows = _gsm8k(shared_data, 12)
    if raw.get("judge", {}).get("mode") == "pairwise":
        data = [{"prompt": r["question"], "response_a": r["answer"], "response_b": "I do not know."} for r in rows]
    else:
        data = [{"messages": [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["answer"]}], "answer": r["answer"]} for r in rows]
        data.append(dict(data[0]))  # an exact duplicate
        data.append({"messages": [{"role": "user", "content": rows[1]["question"]},
                                  {"role": "assistant", "content": "#### 123456789"}], "answer": rows[1]["answer"]})
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in data))
    with _judge_server() as server:
        if "judge" in raw:
            raw["judge"]["backend"].update(base_url=server.base_url, model="scripted", api_key_env=None,
                                           max_retries=1, backoff_s=0.01, timeout_s=10.0)
        config = tmp_path / recipe.name
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        code = cli_main(["filter", "--config", str(config), "--input", str(source), "--output", str(tmp_path / "out"),
                         "--no-progress"])
        assert code == 0
        if "judge" in raw:
            assert sum(server.requests.values()) > 0, "the judge stage asked the server"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest
    kept = (tmp_path / "out" / "kept.jsonl").read_text().splitlines()
    if raw.get("judge", {}).get("mode") == "pairwise":
        return
    assert 0 < len(kept) < len(data)
    if raw.get("dedup", {}).get("exact"):
        assert len(kept) <= len(data) - 1, "the exact duplicate is removed"
    if any(r.get("name") == "verify_answer" for r in raw.get("rules", [])):
        assert all("123456789" not in line for line in kept), "the wrong answer is removed"


# ------------------------------------------------------------------------------------------------ accelerate
@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses_and_validates(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from posttrain.models.hybrid import modeling

    cluster = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "posttrain.cli", "sft",
                                               "--config", "recipes/sft_tiny.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes % args.num_machines == 0
    assert args.mixed_precision in ("no", "bf16", "fp16")
    if cluster.distributed_type.value == "FSDP":
        assert str(cluster.fsdp_config.get("fsdp_version")) == "2", "FSDP recipes are FSDP2"
        wrapped = cluster.fsdp_config.get("fsdp_transformer_layer_cls_to_wrap")
        assert isinstance(getattr(modeling, wrapped, None), type), f"{path}: no layer class {wrapped!r} to wrap"
    if cluster.distributed_type.value == "DEEPSPEED":
        assert cluster.deepspeed_config.get("zero_stage") in (1, 2, 3)


def test_accelerate_config_with_an_unknown_key_is_refused(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    bad = yaml.safe_load(ACCELERATE_CONFIGS[0].read_text())
    bad["num_procesess"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises((TypeError, ValueError), match="num_procesess"):
        ClusterConfig.from_yaml_file(str(path))


def test_recipes_name_accelerate_configs_that_exist():
    named = set()
    for recipe in [*TRAINING_RECIPES, *ACCELERATE_CONFIGS]:
        named |= set(re.findall(r"recipes/accelerate/([\w.-]+\.yaml)", recipe.read_text()))
    assert named, "the recipes' run lines name their accelerate configs"
    missing = {n for n in named if not (RECIPES / "accelerate" / n).is_file()}
    assert not missing
