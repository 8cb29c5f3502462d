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
                 for s in ("data", "pretrain", "filter", "sft", "grpo", "export", "eval")}
    # the filter removes the injected bad samples (wrong answers, malformed chats, duplicates) and keeps the clean
    assert summaries["filter"]["injected_bad_removed_pct"] >= 95.0
    assert summaries["filter"]["clean_lost_pct"] <= 1.0
    # every stage's output is on disk
    for path in ("pretrain/final/config.json", "sft/final/model.safetensors", "grpo/final/config.json",
                 "export/manifest.json", "filter/manifest.json", "filter/kept.jsonl"):
        assert (out / path).is_file(), path
    assert "signature valid" in proc.stdout
    evaluation = summaries["eval"]
    assert evaluation["held_out"] == 250
    for stage in ("base", "sft", "grpo"):
        lo, hi = evaluation[stage]["ci95"]
        assert lo <= evaluation[stage]["accuracy"] <= hi
    # rerunning one stage alone works from the outputs on disk
    again = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--quick", "--out", str(out),
                            "--stage", "export"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
