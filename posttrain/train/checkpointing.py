"""Training checkpoints that survive ``kill -9`` and say when their bytes are not what was written.

``CheckpointManager`` saves and resumes every trainer's runs (through ``posttrain.train.chassis``): ``register``
the objects saved beside the prepared model and optimizer (a scheduler, never prepared), ``save(step, state)`` on
every process (collective under FSDP), ``resume(where)``: the ``state`` saved, model, optimizer, registered objects
and RNG states restored in place, or None on a fresh start.

Each checkpoint is ``checkpoints/step-00000040/``: accelerate's ``save_state`` (model, optimizer, registered
objects, every process's Python/NumPy/torch/CUDA RNG states), ``trainer_state.json`` (the caller's dict: step,
data position, anything a resumed run must know) and, written last, ``checkpoint_manifest.json``: the size and
sha256 of every other file in the folder. The whole is written under a hidden temporary name and renamed when
complete, so a killed run leaves either a whole checkpoint or none; a leftover temporary folder is removed by the
next save. The folder must be on a file system every process sees (for multi-node runs, a shared one). The main
process hashes the files once when it saves (just written, usually still in the page cache).

Resuming verifies a checkpoint before loading anything from it (on the main process; the verdict is shared):
``verify="full"`` (the default) re-hashes every file and compares size and sha256 with the manifest;
``verify="size"`` compares only sizes, for optimizer states too large to re-read at every start: it catches a
truncated, missing or extended file but NOT a byte changed in place (same size, other content), which only
``full`` detects. Either way ``trainer_state.json`` must parse as a JSON object with an integer ``step``, and a
file that passes but still cannot be loaded is reported with the checkpoint's path. Every failure is a
``CheckpointError`` naming the file that differs or is missing, never a bare torch or JSON traceback. The
manifest guards against damage (a full disk, a cut copy, a flipped bit); it is not a signature: whoever can write
the folder can rewrite it. Files the manifest does not list (added later) are not checked.

``resume(where)``: ``"latest"`` (or ``True``) takes the newest checkpoint that verifies and loads. A newer one that
does not is named with the reason in a warning, moved aside to ``step-XXXXXXXX.rejected`` (kept for inspection,
no longer shadowing the good ones nor counted by ``keep_last``), and the previous one is tried. No checkpoint at
all is a fresh start (``None``), so the same command starts and resumes a job; checkpoints that are all invalid
are an error listing each, never a silent start from zero that would later rotate them away. A path resumes
exactly that checkpoint or raises ``CheckpointError`` (nothing is moved or written). ``False``/``None``: no resume.
``resumed_from`` is then the checkpoint loaded (None on a fresh start).

Checkpoints written before manifests existed (no manifest, and a ``trainer_state.json`` without the
``checkpoint_manifest`` marker that every checkpoint written here carries) are accepted with a warning under
both modes: they were written atomically like today's, and refusing them would strand every run in progress at
an upgrade; their bytes simply cannot be checked, and a load that fails is still reported (and, with
``"latest"``, falls back). A checkpoint that carries the marker but lost its manifest is refused as incomplete.

This module never decides when to save or what the data position means.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.provenance import file_digest

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_manifest.json"
VERIFY_MODES = ("full", "size")
_MARKER = "checkpoint_manifest"  # key in trainer_state.json: this checkpoint was written with a manifest
_STEP_DIR = re.compile(r"^step-(\d{8})$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or a file that differs from its manifest."""


class CheckpointManager:
    def __init__(self, accelerator, folder: str | os.PathLike, keep_last: int = 2, verify: str = "full"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"checkpoint verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.verify_mode = verify
        self.resumed_from: Path | None = None  # the checkpoint the last resume() loaded

    def register(self, *objects: Any) -> None:
        """Objects saved beside the model and optimizer (schedulers, samplers): need state_dict/load_state_dict."""
        for obj in objects:
            self.accelerator.register_for_checkpointing(obj)

    # -- where ---------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint folders (``step-XXXXXXXX`` with a trainer state or a manifest), oldest first. A folder with
        neither is not a checkpoint and is left alone."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
                 and ((p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file())]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # -- save ----------------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically, its manifest last; call on every process. Returns its folder."""
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
            payload = json.dumps({**state, "step": step, _MARKER: MANIFEST_FILE}, indent=2, sort_keys=True) + "\n"
            _write_synced(tmp / STATE_FILE, payload)
            files = {name: {"size": p.stat().st_size, "sha256": file_digest(p)} for name, p in _files(tmp)}
            _write_synced(tmp / MANIFEST_FILE, json.dumps({"format": 1, "step": step, "files": files},
                                                          indent=2, sort_keys=True) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            older = [p for p in self.checkpoints() if p != final]  # never the one just written
            for old in older[: max(0, len(older) - (self.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    # -- verify / load -------------------------------------------------------------------------------------
    def verify(self, path: str | os.PathLike) -> None:
        """Raise ``CheckpointError`` naming the file if ``path`` is not a whole checkpoint matching its manifest
        (under this manager's ``verify`` mode). Local: call on one process or on each."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no checkpoint folder there")
        state = _read_state(path)
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.is_file():
            if state is not None and _MARKER in state:
                raise CheckpointError(f"{manifest_file}: missing (the checkpoint is incomplete)")
            if state is None:
                raise CheckpointError(f"{path / STATE_FILE}: missing (not a complete checkpoint)")
            log.warning("%s has no %s (written before checkpoints carried one): its files cannot be verified; "
                        "resuming from it as it is", path, MANIFEST_FILE)
            return
        try:
            manifest = json.loads(manifest_file.read_text())
            files = manifest["files"]
            entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{manifest_file}: unreadable manifest ({type(e).__name__}: {e})") from None
        for name, size, digest in entries:
            file = path / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise CheckpointError(f"{manifest_file}: names a file outside the checkpoint: {name!r}")
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in {MANIFEST_FILE})")
            actual = file.stat().st_size
            if actual != size:
                raise CheckpointError(f"{file}: {actual} bytes, the manifest says {size} (truncated or changed)")
            if self.verify_mode == "full" and file_digest(file) != digest:
                raise CheckpointError(f"{file}: sha256 differs from the manifest (the file is corrupted)")
        if state is None:
            raise CheckpointError(f"{path / STATE_FILE}: missing (not a complete checkpoint)")

    def load(self, path: str | os.PathLike, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Verify ``path``, then restore model, optimizer, registered objects and RNG states from it; returns its
        trainer state. Any failure is a ``CheckpointError`` naming the file (or the checkpoint when the loader
        cannot say which file). ``check(state)`` may refuse the checkpoint for this run (raising another error,
        with ``resumed_from`` naming it) before anything is loaded."""
        path = Path(path)
        acc = self.accelerator
        problem = None
        if acc.is_main_process:
            try:
                self.verify(path)
            except CheckpointError as e:
                problem = str(e)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise CheckpointError(problem)
        state = _read_state(path)
        if state is None:  # verified on the main process, missing here: a folder not every process sees
            raise CheckpointError(f"{path / STATE_FILE}: missing on process {acc.process_index}")
        if check is not None:
            self.resumed_from = path
            check(state)
        try:
            acc.load_state(str(path))
        except Exception as e:  # noqa: BLE001 - any loader failure becomes an error naming the checkpoint
            raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
        state.pop(_MARKER, None)
        return state

    def resume(self, where: bool | str | os.PathLike | None = "latest",
               check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Load the checkpoint ``where`` names (see the module doc; ``check`` as in ``load``) and return its trainer
        state, or None for a fresh start."""
        self.resumed_from = None
        if where is None or where is False:
            return None
        if where is True or str(where) == "latest":
            return self._resume_latest(check)
        state = self.load(where, check)
        self.resumed_from = Path(where)
        return state

    def _resume_latest(self, check: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
        acc = self.accelerator
        candidates = self.checkpoints()
        rejected: list[tuple[Path, str]] = []
        for path in reversed(candidates):
            try:
                state = self.load(path, check)
            except CheckpointError as e:
                if acc.is_main_process:
                    log.warning("checkpoint %s cannot be resumed from: %s", path, e)
                rejected.append((path, str(e)))
                continue
            self.resumed_from = path
            if rejected:
                self._set_aside([p for p, _ in rejected])
                if acc.is_main_process:
                    log.warning("resuming from %s, the newest valid checkpoint; set aside as invalid: %s", path,
                                ", ".join(f"{p.name} ({why})" for p, why in rejected))
            return state
        if rejected:
            raise CheckpointError(
                f"no valid checkpoint in {self.folder}: " + "; ".join(f"{p.name}: {why}" for p, why in rejected)
                + f". Nothing was loaded; to start over, move them out of {self.folder}")
        return None

    def _set_aside(self, paths: list[Path]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            for path in paths:
                target = path.with_name(path.name + ".rejected")
                n = 1
                while target.exists():
                    target = path.with_name(f"{path.name}.rejected.{n}")
                    n += 1
                os.replace(path, target)
            _fsync_dir(self.folder)
        acc.wait_for_everyone()


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _read_state(path: Path) -> dict[str, Any] | None:
    """The trainer state of checkpoint ``path``; None when the file is missing, CheckpointError when it is not
    a JSON object with an integer ``step``."""
    file = path / STATE_FILE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise CheckpointError(f"{file}: not a trainer state (a JSON object with an integer 'step')")
    return state


def _files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` but the manifest, as (relative posix name, path), sorted."""
    out = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()]
    return sorted((name, p) for name, p in out if name != MANIFEST_FILE)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
