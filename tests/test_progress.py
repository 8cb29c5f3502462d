"""The progress display: plain periodic lines (steps of the total, elapsed, ETA, the stage's figures) when not on a
terminal, nothing when disabled; and the training chassis uses it (``posttrain sft``'s output when piped)."""

from __future__ import annotations

import io
import re

from posttrain.progress import StageProgress


def test_plain_lines_show_steps_eta_and_figures():
    out = io.StringIO()
    with StageProgress("sft", total=4, start=0, interval_s=0.0, stream=out) as p:
        for step in range(4):
            p.advance(loss=f"{1.0 / (step + 1):.4f}", tok_per_s="1,000")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sft: step 0/4 (0%), elapsed 0m00s, ETA ?")
    assert lines[-1].startswith("sft: step 4/4 (100%), elapsed ")
    assert re.search(r"ETA 0m00s, loss 0\.2500, tok per s 1,000$", lines[-1]), lines[-1]
    assert len(lines) == 5  # the start, then every step (interval 0)


def test_plain_lines_are_rate_limited_and_resumed_runs_count_from_their_start():
    out = io.StringIO()
    with StageProgress("dpo", total=100, start=40, interval_s=3600.0, stream=out, unit="step") as p:
        for _ in range(60):
            p.advance()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["dpo: step 40/100 (40%)", "dpo: step 100/100 (100%)"]


def test_disabled_shows_nothing():
    out = io.StringIO()
    with StageProgress("grpo", total=3, enabled=False, interval_s=0.0, stream=out) as p:
        p.advance(3)
    assert out.getvalue() == "" and p.done == 3
