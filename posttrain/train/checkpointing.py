"""Training checkpoints that survive ``kill -9``: model, optimizer, scheduler, RNG states and the data position.

``CheckpointManager`` is the one component every trainer (pretrain, SFT, GRPO) uses::

    manager = CheckpointManager(accelerator, Path(out) / "checkpoints", keep_last=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    manager.register(scheduler)                 # anything with state_dict()/load_state_dict(); NOT prepared
    state = manager.resume()                    # None on a fresh start; else the dict given to save(), restored
    step = state["step"] if state else 0        # ... and the model/optimizer/scheduler/RNG are restored in place
    ...
    if step % every == 0:
        manager.save(step, {"step": step, "epoch": epoch, ...})   # on every process (collective under FSDP)

Each checkpoint is ``checkpoints/step-00000040/``: accelerate's ``save_state`` (model, optimizer, registered
objects, every process's Python/NumPy/torch/CUDA RNG states) plus ``trainer_state.json`` (the caller's dict: step,
data position, anything a resumed run must know). It is written under a hidden temporary name and renamed when
complete, so a killed run leaves either a whole checkpoint or none; ``latest()`` only ever sees whole ones, and a
leftover temporary folder is removed by the next save. The folder must be on a file system every process sees
(for multi-node runs, a shared one). This module never decides when to save or what the data position means.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointManager:
    def __init__(self, accelerator, folder: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.keep_last = keep_last

    def register(self, *objects: Any) -> None:
        """Objects saved beside the model and optimizer (schedulers, samplers): need state_dict/load_state_dict."""
        for obj in objects:
            self.accelerator.register_for_checkpointing(obj)

    # -- where ---------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # -- save / load ---------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; call on every process. Returns its folder."""
        acc = self.accelerator
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=False)
        acc.wait_for_everyone()
        if acc.is_main_process:
            payload = json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n"
            with open(tmp / STATE_FILE, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimizer, registered objects and RNG states from ``path``; returns its trainer state."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        self.accelerator.load_state(str(path))
        return json.loads(state_file.read_text())

    def resume(self) -> dict[str, Any] | None:
        """Load the latest complete checkpoint if there is one; None for a fresh start."""
        latest = self.latest()
        return None if latest is None else self.load(latest)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
