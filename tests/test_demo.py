"""The README's main command, shortened: every stage of ``posttrain demo --quick`` runs end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LLM judge: skipped" in proc.stdout
    summaries = {s: json.loads((out / f"{s}.summary.json").read_text())
                 for s in ("data", "pretrain", "filter", "sft", "dpo", "grpo", "export", "eval")}
    # the filter removes the injected bad samples (wrong answers, malformed chats, duplicates) and keeps the clean
    assert summaries["filter"]["injected_bad_removed_pct"] >= 95.0
    assert summaries["filter"]["clean_lost_pct"] <= 1.0
    assert "injected bad samples" in proc.stdout and all(s["time"]["cpu_s"] > 0 for s in summaries.values())
    # every stage's output is on disk
    for path in ("pretrain/final/config.json", "sft/final/model.safetensors", "grpo/final/config.json",
                 "dpo/pairs_add.jsonl", "dpo/pairs_tool.jsonl", "dpo/final/config.json",
                 "export/manifest.json", "filter/manifest.json", "filter/kept.jsonl"):
        assert (out / path).is_file(), path
    assert "signature valid" in proc.stdout
    evaluation = summaries["eval"]
    assert evaluation["held_out"] == {"add": 300, "tool": 250, "all": 550}
    for table in (evaluation, evaluation["sampled"]):  # greedy, then sampled answers
        for stage, baseline in (("base", None), ("sft", "base"), ("dpo", "sft"), ("grpo", "sft")):
            for task in ("add", "tool", "all"):
                result = table[stage][task]
                lo, hi = result["ci95"]
                assert lo <= result["accuracy"] <= hi
                assert result["vs"] == baseline and (result["p"] is None) == (baseline is None)
    assert evaluation["sampled"]["samples_per_item"] == 2 and "sampled answers each" in proc.stdout  # 8 without --quick
    # rerunning one stage alone works from the outputs on disk
    again = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--quick", "--out", str(out),
                            "--stage", "export"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]


def test_held_out_items_are_disjoint_from_every_training_item(tmp_path):
    import argparse
    import re

    from posttrain.demo import stage_data

    summary = stage_data(tmp_path, argparse.Namespace(seed=3))
    folder = tmp_path / "data"

    def pairs(text: str, op: str) -> set[tuple[int, int]]:
        return {(int(a), int(b)) for a, b in re.findall(r"(\d+)" + re.escape(op) + r"(\d+)=", text)}

    held = (folder / "held_out.jsonl").read_text()
    assert summary["held_out"] == {"add": 300, "tool": 250}
    for op, n in (("+", 300), ("*", 250)):
        held_pairs = pairs(held, op)
        assert len(held_pairs) == n
        for name in ("sft_candidates.jsonl", "grpo_prompts.jsonl"):
            text = (folder / name).read_text()
            assert not pairs(text, op) & held_pairs, (name, op)
    # the calls of the clean SFT demonstrations and the GRPO ground truth name no held-out pair either (an injected
    # wrong call may: it names the wrong operands on purpose, and the filter removes it)
    held_products = pairs(held, "*")
    clean = "".join(line for line in (folder / "sft_candidates.jsonl").read_text().splitlines()
                    if '"demo_kind": "clean"' in line)
    for name, text in (("sft", clean), ("grpo", (folder / "grpo_prompts.jsonl").read_text())):
        calls = {(int(a), int(b)) for a, b in re.findall(r'"a": \[?(\d+)\]?, "b": \[?(\d+)', text)}
        assert calls and not calls & held_products, name
    corpus = (folder / "pretrain.jsonl").read_text()
    pretrain_products = {(int(a), int(b)) for a, b in re.findall(r"(\d+) times (\d+)", corpus)}
    assert pairs(corpus, "+") and not pairs(corpus, "+") & pairs(held, "+")
    assert pretrain_products and not pretrain_products & held_products

