"""The demo's DPO stage and its seed: the validation slice DPO's settings are chosen on holds training items only
(never a held-out item, a pair's prompt or an SFT demonstration), and ``--seed`` reaches every stage's recipe."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from posttrain import demo
from posttrain.config import build_config
from posttrain.dpo.config import DpoConfig
from posttrain.grpo.config import GrpoConfig
from posttrain.train.config import TrainConfig


def operands(text: str, op: str) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in re.findall(r"(\d+)" + re.escape(op) + r"(\d+)=", text)}


def test_the_validation_slice_is_training_items_that_no_pair_and_no_demonstration_uses(tmp_path):
    args = argparse.Namespace(seed=5)
    demo.stage_data(tmp_path, args)
    pair_prompts, validation = demo._dpo_slices(args.seed)
    held = (tmp_path / "data" / "held_out.jsonl").read_text()
    training = (tmp_path / "data" / "grpo_prompts.jsonl").read_text()  # every training item of both tasks
    demonstrations = (tmp_path / "data" / "sft_candidates.jsonl").read_text()
    pairs_text, validation_text = json.dumps(pair_prompts), json.dumps(validation)
    for op, task in (("+", "add"), ("*", "tool")):
        mine = operands(validation_text, op)
        assert len(mine) == demo.DPO_VALIDATION[task] == sum(r["task"] == task for r in validation)
        assert mine <= operands(training, op)
        assert not mine & operands(held, op) and not mine & operands(demonstrations, op)
        assert not mine & operands(pairs_text, op)
    # the pairs are built on every other training item, each task's on its own file
    for op, task in (("+", "add"), ("*", "tool")):
        assert operands(json.dumps(pair_prompts[task]), op) == operands(training, op) - operands(validation_text, op)
        assert all(r["task"] == task for r in pair_prompts[task])
    assert demo._dpo_slices(6)[1] != validation  # another seed, another slice


def test_reference_answers_are_written_as_the_sft_targets_are(tmp_path):
    """The chosen answer a pair falls back on is the assistant turn of the item's SFT demonstration as the chat
    template renders it: the sum, or the tagged call (which the tool-call reward verifies), without the end of turn."""
    from posttrain.rewards import get

    from posttrain.tokenizer import load_tokenizer

    demo.stage_data(tmp_path, argparse.Namespace(seed=0))
    tokenizer = load_tokenizer(tmp_path / "data" / "tokenizer")
    add, tool = demo._item("add", 47, 8), demo._item("tool", 47, 6)
    assert demo._reference_answer(tokenizer, add) == "55"
    call = demo._reference_answer(tokenizer, tool)
    assert call == '<tool_call>{"name": "multiply", "arguments": {"a": 47, "b": 6}}</tool_call>'
    reward = get("tool_call", **demo.TOOL_REWARD_OPTIONS)
    assert reward([tool["prompt"]], [[{"role": "assistant", "content": call}]],
                  ground_truth=[tool["ground_truth"]], tool_schema=[tool["tool_schema"]]) == [1.0]


def test_seed_reaches_every_stage(tmp_path, monkeypatch):
    """Every recipe the demo writes carries ``--seed`` (the commands themselves are not run here: each stage's
    recipe is read back as the command would read it)."""
    seen: dict[str, dict] = {}

    def fake_cli(*argv):
        command, recipe = argv[0], yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
        seen[command] = recipe
        if command == "pairs":  # what posttrain pairs leaves behind, for the stage to count
            seen.setdefault("pairs_all", []).append(recipe)
            out = Path(recipe["output"])
            out.write_text(json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "4"}) + "\n")
            Path(f"{out}.manifest.json").write_text(json.dumps({"on_policy": {
                "chosen_from_sample": 0, "chosen_from_reference": 0, "greedy_refuted": 0}}))

    monkeypatch.setattr(demo, "_cli", fake_cli)
    monkeypatch.setattr(demo, "_accuracy", lambda folder, items, *a, **k: [0.0] * len(items))
    args = argparse.Namespace(seed=7, quick=True, judge_url=None)
    demo.stage_data(tmp_path, args)
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        getattr(demo, f"stage_{stage}")(tmp_path, args)
    assert seen["pretrain"]["run"]["seed"] == seen["sft"]["run"]["seed"] == seen["dpo"]["run"]["seed"] == 7
    for command, cls in (("pretrain", TrainConfig), ("sft", TrainConfig), ("dpo", DpoConfig), ("grpo", GrpoConfig)):
        build_config(cls, seen[command], command)  # every recipe loads as its command loads it: no old field names
    assert seen["pairs"]["sampling"]["seed"] == 7 and seen["grpo"]["run"]["seed"] == 7
    by_task = {Path(r["prompts_file"]).name: r for r in seen["pairs_all"]}
    assert sorted(by_task) == ["pair_prompts_add.jsonl", "pair_prompts_tool.jsonl"]
    assert {r["verdict"]["reward"] for r in by_task.values()} == {"math", "tool_call"}
    assert all(r["pairing"] == "on_policy" and r["verdict"]["reference_answer"] == "{reference}"
               for r in by_task.values())
    assert sorted(Path(f).name for f in seen["dpo"]["data"]["train_files"]) == ["pairs_add.jsonl", "pairs_tool.jsonl"]
    text = (tmp_path / "recipes" / "dpo.yaml").read_text()
    assert text.startswith("# beta, nll_weight, lr and steps") and "validation slice" in text
    assert seen["dpo"]["loss"]["beta"] == demo.DPO_SETTINGS["beta"] and seen["dpo"]["optim"]["max_steps"] == 10

    # a setting overridden for the validation sweep reaches the recipe; an unknown one is an error naming it
    demo.stage_dpo(tmp_path, argparse.Namespace(seed=7, quick=False, dpo_setting=["beta=0.3", "steps=25"]))
    assert seen["dpo"]["loss"]["beta"] == 0.3 and seen["dpo"]["optim"]["max_steps"] == 25
    with pytest.raises(SystemExit, match="--dpo-setting 'gamma=1': expected KEY=VALUE with KEY one of beta"):
        demo.stage_dpo(tmp_path, argparse.Namespace(seed=7, quick=False, dpo_setting=["gamma=1"]))
