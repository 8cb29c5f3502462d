"""``posttrain verify``: check an exported checkpoint's signature and every file's SHA-256.

``verify_checkpoint(folder, public_key=None)`` returns the problems found, each naming the file: a file whose
hash or size differs from ``manifest.json``, a listed file that is missing, a file the manifest does not list, a
signature that does not match the manifest (or was made with another key than ``public_key``). An empty list
means the folder is exactly what was signed. Without ``public_key`` the embedded ``signing_key.pub`` is used,
which proves integrity but not who signed. This module never modifies the folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from posttrain.export import FORMAT, MANIFEST, PUBLIC_KEY, SIGNATURE, UNSIGNED, key_fingerprint, sha256_file


def verify_checkpoint(folder: str | os.PathLike, public_key: str | os.PathLike | None = None) -> list[str]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    folder = Path(folder)
    for name in (MANIFEST, SIGNATURE):
        if not (folder / name).is_file():
            return [f"{name}: missing; {folder} is not a signed export"]
    key_file = Path(public_key) if public_key is not None else folder / PUBLIC_KEY
    if not key_file.is_file():
        return [f"{key_file}: public key not found"]
    problems: list[str] = []
    body = (folder / MANIFEST).read_bytes()
    try:
        key = serialization.load_pem_public_key(key_file.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            return [f"{key_file}: not an Ed25519 public key"]
        key.verify(base64.b64decode((folder / SIGNATURE).read_text().strip()), body)
    except InvalidSignature:
        problems.append(f"{MANIFEST}: the signature in {SIGNATURE} does not match it"
                        + (f" under the key {key_file}" if public_key is not None else ""))
    except ValueError as e:
        problems.append(f"{SIGNATURE}: cannot be read ({e})")
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError as e:
        return problems + [f"{MANIFEST}: not valid JSON (line {e.lineno}: {e.msg})"]
    if manifest.get("format") != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    expected_fp = manifest.get("signature", {}).get("public_key_sha256")
    if expected_fp is not None and key_fingerprint(key_file.read_bytes()) != expected_fp:
        problems.append(f"{key_file.name}: not the key the manifest names (fingerprint differs)")
    listed = manifest.get("files", {})
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: contents differ from the signed manifest (sha256 mismatch)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed and rel not in UNSIGNED:
            problems.append(f"{rel}: not listed in the signed manifest")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an exported checkpoint")
    parser.add_argument("--public-key", help="the publisher's Ed25519 public key (PEM); default: the embedded one")


def run(args: argparse.Namespace) -> int:
    problems = verify_checkpoint(args.folder, args.public_key)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    n = len(json.loads((Path(args.folder) / MANIFEST).read_text())["files"])
    print(f"OK {args.folder}: signature valid, {n} files match the manifest")
    return 0
