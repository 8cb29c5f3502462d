"""Manifests and the SHA-256 digests they record: of bytes or text, of a file or folder, of a checkpoint's weights.

Training, DPO, merge, export, checkpoint and filter manifests, judge cache keys and reward identities name their
inputs by these digests, so what one module hashes another checks with the same function (lowercase hex). A
manifest records its data files with ``data_provenance`` and the library versions with ``versions``, and is written
by ``write_manifest`` (atomically); a folder of them is written whole with ``new_folder``. This module never signs,
and never decides what a digest must match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TRAINING_MANIFEST = "training_manifest.json"  # what a training run writes beside its final weights


def bytes_digest(data: bytes | str) -> str:
    """sha256 of ``data``; text is hashed as its UTF-8 bytes."""
    return stream_digest([data])


def stream_digest(chunks: Iterable[bytes | str]) -> str:
    """sha256 of the chunks one after the other (the digest of their concatenation, never held whole)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (sorted; each preceded by its relative path and a NUL)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_digest(folder: str | os.PathLike) -> str:
    """sha256 over a checkpoint's config.json and weight files (names and bytes, sorted): its identity."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")])
    for p in files:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + bytes.fromhex(file_digest(p)))
    return h.hexdigest()


def checkpoint_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """What a training manifest records of the checkpoint a run starts from: its resolved path, the sha256 of its
    weights, and that of the training manifest it carries from its own run, if any."""
    entry: dict[str, Any] = {"path": str(Path(folder).resolve()), "sha256": weights_digest(folder)}
    upstream = Path(folder) / TRAINING_MANIFEST
    if upstream.is_file():
        entry["training_manifest_sha256"] = file_digest(upstream)
    return entry


def data_provenance(path: str) -> dict[str, Any]:
    """What a manifest records of a data file or folder: its resolved path and sha256, and the manifest beside it
    (e.g. the one ``posttrain filter`` writes) with its sha256; of a hub data set (``hf:NAME``), its name and the
    fingerprint ``datasets`` gives its cached copy."""
    from posttrain.train.data import DataError, is_hub_spec, load_hub_dataset

    if is_hub_spec(path):
        return {"dataset": path, "fingerprint": load_hub_dataset(path, DataError)._fingerprint}
    p = Path(path)
    entry: dict[str, Any] = {"path": str(p.resolve()), "sha256": file_digest(p)}
    beside = (p if p.is_dir() else p.parent) / "manifest.json"
    if beside.is_file():
        entry["manifest"] = str(beside.resolve())
        entry["manifest_sha256"] = file_digest(beside)
    return entry


def versions() -> dict[str, str]:
    """The versions of posttrain and of the libraries a training run depends on."""
    import accelerate
    import torch
    import transformers

    import posttrain

    return {"posttrain": posttrain.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def write_manifest(path: str | os.PathLike, data: Any, *, canonical: bool = True) -> bytes:
    """Write ``data`` as JSON (indented, one final newline) at ``path`` atomically: to a temporary sibling
    ``.NAME.tmp-PID``, flushed to disk, then renamed over ``path``. Returns the bytes written (what a signature signs).

    ``canonical``: keys sorted, ASCII only, a value JSON has no form for written as its ``str`` (the form that is
    hashed and signed); else the keys in their order and the text as it is (a manifest for a person to read)."""
    path = Path(path)
    if canonical:
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False)
    body = (text + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return body


@contextlib.contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A fresh ``OUT.tmp`` folder to write ``out``'s files into; on leaving the block it replaces ``out`` whole, so a
    reader never sees a half-written folder, and an error inside leaves ``out`` as it was."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
