"""The human-readable report of a filter run: a rich summary table and a picture (judge-score histogram,
rejections per filter) drawn with matplotlib's Agg backend. It only presents counts the pipeline computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def print_summary(report: Any, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title=f"posttrain filter: {report.kept} of {report.total} kept")
    table.add_column("filter")
    table.add_column("rejected", justify="right")
    table.add_column("share of input", justify="right")
    for name, count in sorted(report.rejected_by.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(name, str(count), f"{count / max(report.total, 1):.1%}")
    table.add_section()
    for stage in ("rules", "dedup", "judge"):
        count = report.stage_rejections.get(stage, 0)
        table.add_row(f"stage: {stage}", str(count), f"{count / max(report.total, 1):.1%}")
    table.add_row("kept", str(report.kept), f"{report.kept / max(report.total, 1):.1%}")
    if report.judge_requests_sent or report.judge_requests_cached:
        table.add_row("judge requests sent / cached", f"{report.judge_requests_sent} / {report.judge_requests_cached}", "")
    console.print(table)


def save_picture(report: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if report.judge_scores:
        left.hist(report.judge_scores, bins=20, color="#4c72b0")
        left.set_title("judge scores")
        left.set_xlabel("score")
        left.set_ylabel("samples")
    else:
        left.text(0.5, 0.5, "no judge scores", ha="center", va="center")
        left.set_axis_off()
    names = sorted(report.rejected_by, key=lambda n: -report.rejected_by[n])
    right.barh(names[::-1], [report.rejected_by[n] for n in names[::-1]], color="#dd8452")
    right.set_title(f"rejections per filter ({report.total - report.kept} of {report.total} rejected)")
    right.set_xlabel("samples")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
