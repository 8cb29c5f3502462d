"""The progress display of long stages: steps done of the total, the ETA and the stage's key figures.

On a terminal it is a rich progress bar on stderr; anywhere else (a log file, CI, the demo's captured output) it is
a plain line on stderr at most every ``interval_s`` seconds, plus the first and the last, so a long stage is never
silent and never floods a log. Only the main process shows it (``enabled=False`` elsewhere). This module never
computes a figure itself beyond the rate and the ETA; it shows what the stage gives it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Self, TextIO


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class StageProgress:
    """``with StageProgress("sft", total=100) as p: ... p.advance(loss="1.234")`` once per step.

    Args:
        stage: the stage's name, the start of every line.
        total: steps in the stage; start: steps already done (a resumed run).
        enabled: False shows nothing (non-main processes, ``logging.progress: false``).
        unit: what a step is called in plain lines ("step", "prompt", "sample").
        interval_s: least time between two plain lines.
        stream: where to write (default stderr); a rich bar only when it is a terminal.
    """

    def __init__(self, stage: str, total: int, start: int = 0, *, enabled: bool = True, unit: str = "step",
                 interval_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.stage, self.total, self.start, self.done = stage, total, start, start
        self.enabled, self.unit, self.interval_s = enabled, unit, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.figures: dict[str, str] = {}
        self._bar: Any = None
        self._t0 = self._last_line = 0.0
        self._printed_at: int | None = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream))
            self._task = self._bar.add_task(stage, total=total, completed=start, info="")

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
        elif self.enabled:
            self._line()
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.done != self._printed_at:
            self._line()
        return False

    def advance(self, steps: int = 1, **figures: Any) -> None:
        """``steps`` more done; ``figures`` (name -> value, shown as given) replace the previous ones."""
        self.done += steps
        self.figures.update({k.replace("_", " "): str(v) for k, v in figures.items()})
        if not self.enabled:
            return
        info = "  ".join(f"{k} {v}" for k, v in self.figures.items())
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, info=info)
        elif time.perf_counter() - self._last_line >= self.interval_s or self.done >= self.total:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        ran = self.done - self.start  # the ETA: seconds left at this run's rate so far (none before the first step)
        eta = (time.perf_counter() - self._t0) / ran * max(self.total - self.done, 0) if ran > 0 else None
        parts = [f"{self.stage}: {self.unit} {self.done}/{self.total} ({pct:.0f}%)",
                 f"elapsed {_duration(now - self._t0)}", f"ETA {_duration(eta) if eta is not None else '?'}"]
        parts += [f"{k} {v}" for k, v in self.figures.items()]
        print(", ".join(parts), file=self.stream, flush=True)
        self._last_line, self._printed_at = now, self.done
