"""The SHA-256 digests every manifest records: of bytes or text, of a file or folder, of a checkpoint's weights.

Training, DPO, merge, export, checkpoint and filter manifests, judge cache keys and reward identities name their
inputs by these digests, so what one module hashes another checks with the same function (lowercase hex). This
module only reads: it never writes a manifest, signs, or decides what a digest must match.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def bytes_digest(data: bytes | str) -> str:
    """sha256 of ``data``; text is hashed as its UTF-8 bytes."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


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
