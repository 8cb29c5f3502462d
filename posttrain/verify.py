"""``posttrain verify``: check an exported checkpoint's files, its signature, and who signed it.

Two separate questions, answered separately:

- **Integrity**: ``manifest.sig`` is an Ed25519 signature of ``manifest.json``'s exact bytes, every file the
  manifest lists has the SHA-256 and size it lists, none is missing and no unlisted file sits beside them.
- **Publisher**: the key that made the signature is one the user trusts. The key inside the folder
  (``signing_key.pub``) cannot answer this: whoever replaces the weights can re-sign the folder with a key of their
  own and put that key there. Trusted keys come from ``--public-key PEM`` (repeatable) and ``--trusted-keys FILE``
  (PEM keys one after the other), or, when neither is given, from the file named by ``$POSTTRAIN_TRUSTED_KEYS``.
  A key is named by its fingerprint: SHA-256 of its raw 32 bytes, hex.

Exit codes: 0 the folder is intact and signed by a trusted key (or intact, with no trusted key given, under
``--allow-untrusted``); 1 integrity fails (each problem names its file); 2 bad input (no such folder, not a signed
export, a key file that is missing or holds no Ed25519 public key); 3 intact but the publisher is not verified: no
trusted key was given (the signer's fingerprint is printed), or the signer is not a trusted key (both named).
``--allow-untrusted`` accepts the first case only. This module never modifies the folder.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.export import FORMAT, MANIFEST, PUBLIC_KEY, SIGNATURE, key_fingerprint, signed_files
from posttrain.provenance import bytes_digest, file_digest

TRUSTED_KEYS_ENV = "POSTTRAIN_TRUSTED_KEYS"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


class VerifyInputError(ValueError):
    """Input that cannot be checked at all (no folder, not an export, an unreadable key file); says which."""


@dataclass
class Verification:
    """What ``check_export`` found."""

    folder: Path
    problems: list[str]  # integrity problems, each naming its file; empty: the folder is exactly what was signed
    signer: str | None  # fingerprint of the key the signature verifies under (None: no key verifies it)
    trusted: list[str] = field(default_factory=list)  # fingerprints of the trusted keys given (empty: none given)
    files: int = 0  # files the manifest lists

    @property
    def publisher_verified(self) -> bool:
        return not self.problems and self.signer is not None and self.signer in self.trusted


def load_public_keys(path: str | os.PathLike) -> list[Any]:
    """Every Ed25519 public key in a PEM file (one or more ``BEGIN PUBLIC KEY`` blocks); anything else in it, or
    no key at all, is a :class:`VerifyInputError` naming the file and the block."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VerifyInputError(f"{path}: cannot read the key file ({e.strerror or e})") from None
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise VerifyInputError(f"{path}: no PEM public key in it (expected -----BEGIN PUBLIC KEY----- blocks)")
    keys = []
    for number, block in enumerate(blocks, start=1):
        label = block.group(1).decode()
        if label != "PUBLIC KEY":
            raise VerifyInputError(f"{path}: PEM block {number} is a {label!r}, not a PUBLIC KEY"
                                   + (" (give the public key, never the private one)" if "PRIVATE" in label else ""))
        try:
            key = serialization.load_pem_public_key(block.group(0))
        except ValueError as e:
            raise VerifyInputError(f"{path}: PEM block {number} is not a readable public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise VerifyInputError(f"{path}: PEM block {number} is a {type(key).__name__}, not an Ed25519 key")
        keys.append(key)
    return keys


def trusted_key_files(public_keys: Sequence[str] = (), trusted_keys: str | None = None) -> list[Path]:
    """The files to read trusted keys from: the command line's, or else ``$POSTTRAIN_TRUSTED_KEYS``'s."""
    files = [Path(p) for p in public_keys] + ([Path(trusted_keys)] if trusted_keys else [])
    if files:
        return files
    env = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [Path(env)] if env else []


def check_export(folder: str | os.PathLike, trusted: Sequence[Any] = ()) -> Verification:
    """Check ``folder``'s integrity and find the key that signed it (see the module docstring).

    ``trusted``: Ed25519 public keys (``load_public_keys``). The signature is tried under them first, then under the
    embedded key; ``signer`` is the fingerprint of the one it verifies under. Raises :class:`VerifyInputError` when
    ``folder`` is not a folder or holds neither ``manifest.json`` nor ``manifest.sig``.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    folder = Path(folder)
    trusted_fps = [key_fingerprint(k) for k in trusted]
    if not folder.is_dir():
        raise VerifyInputError(f"{folder}: no such folder")
    present = {name: (folder / name).is_file() for name in (MANIFEST, SIGNATURE)}
    if not any(present.values()):
        raise VerifyInputError(f"{folder}: not a signed export (no {MANIFEST}, no {SIGNATURE})")
    missing = [f"{name}: missing; the folder cannot be checked against its signature"
               for name, found in present.items() if not found]
    if missing:
        return Verification(folder, missing, None, trusted_fps)

    problems: list[str] = []
    body = (folder / MANIFEST).read_bytes()
    try:
        signature = base64.b64decode((folder / SIGNATURE).read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        return Verification(folder, [f"{SIGNATURE}: not a base64 signature ({e})"], None, trusted_fps)

    def verifies(key: Any) -> bool:
        try:
            key.verify(signature, body)
        except InvalidSignature:
            return False
        return True

    signer = next((fp for key, fp in zip(trusted, trusted_fps) if verifies(key)), None)
    embedded, embedded_pem = None, None
    key_file = folder / PUBLIC_KEY
    if key_file.is_file():
        embedded_pem = key_file.read_bytes()
        try:
            embedded = serialization.load_pem_public_key(embedded_pem)
        except ValueError as e:
            problems.append(f"{PUBLIC_KEY}: not a readable public key ({e})")
        else:
            if not isinstance(embedded, Ed25519PublicKey):
                problems.append(f"{PUBLIC_KEY}: a {type(embedded).__name__}, not an Ed25519 key")
                embedded = None
    elif signer is None:
        problems.append(f"{PUBLIC_KEY}: missing, and no trusted key verifies the signature")
    if embedded is not None:
        if signer is None and verifies(embedded):
            signer = key_fingerprint(embedded)
        elif signer is not None and key_fingerprint(embedded) != signer:
            problems.append(f"{PUBLIC_KEY}: not the key that signed the manifest (it is {key_fingerprint(embedded)}, "
                            f"the signer is {signer})")
    if signer is None and (embedded is not None or trusted):
        under = " or ".join(filter(None, ["any trusted key" if trusted else "", "the embedded key" if embedded else ""]))
        problems.append(f"{MANIFEST}: the signature in {SIGNATURE} does not match it under {under}")

    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Verification(folder, problems + [f"{MANIFEST}: not valid JSON ({e})"], signer, trusted_fps)
    if not isinstance(manifest, dict):
        return Verification(folder, problems + [f"{MANIFEST}: not a JSON object"], signer, trusted_fps)
    if manifest.get("format") != FORMAT:
        problems.append(f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    named = (manifest.get("signature") or {}).get("public_key_sha256")
    if named is not None and signer is not None:
        # exports made before keys were named by their raw bytes name them by the PEM file's SHA-256
        legacy = bytes_digest(embedded_pem) if embedded_pem is not None else None
        if named not in (signer, legacy):
            problems.append(f"{MANIFEST}: names signing key {named}, but the signer is {signer}")
    listed = manifest.get("files") or {}
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.get("size") or file_digest(path) != entry.get("sha256"):
            problems.append(f"{rel}: contents differ from the signed manifest (sha256 mismatch)")
    problems += [f"{rel}: not listed in the signed manifest" for rel in signed_files(folder) if rel not in listed]
    return Verification(folder, problems, signer, trusted_fps, len(listed))


def verify_checkpoint(folder: str | os.PathLike, public_key: str | os.PathLike | None = None) -> list[str]:
    """The integrity problems of ``folder`` (empty: intact), and, with ``public_key`` (a PEM file of trusted keys),
    a problem when the signer is not among them. For the exit codes and the full answer use ``check_export``."""
    trusted = load_public_keys(public_key) if public_key is not None else []
    result = check_export(folder, trusted)
    if result.problems or not trusted or result.publisher_verified:
        return result.problems
    trusted_list = ", ".join(result.trusted)
    return [f"{MANIFEST}: the signature was made by key {result.signer}, which is not a trusted key ({trusted_list})"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an exported checkpoint")
    parser.add_argument("--public-key", action="append", default=[], metavar="PEM",
                        help="a trusted publisher's Ed25519 public key (PEM file; repeatable)")
    parser.add_argument("--trusted-keys", metavar="FILE",
                        help=f"a file of trusted PEM public keys, one after the other (default: ${TRUSTED_KEYS_ENV} "
                             "when no --public-key is given either)")
    parser.add_argument("--allow-untrusted", action="store_true",
                        help="with no trusted key given, exit 0 after checking integrity alone (the publisher stays "
                             "unverified); never accepts a signer that is not among the trusted keys given")


def run(args: argparse.Namespace) -> int:
    try:
        trusted = [k for path in trusted_key_files(args.public_key, args.trusted_keys) for k in load_public_keys(path)]
        result = check_export(args.folder, trusted)
    except VerifyInputError as e:
        print(f"posttrain verify: error: {e}", file=sys.stderr)
        return 2
    if result.problems:
        for problem in result.problems:
            print(f"FAIL {problem}")
        print(f"FAIL {args.folder}: not what was signed ({len(result.problems)} problems)")
        return 1
    print(f"OK {args.folder}: signature valid, {result.files} files match the manifest (integrity verified)")
    print(f"signing key: {result.signer}")
    if not result.trusted:
        print("PUBLISHER NOT VERIFIED: no trusted key was given (--public-key, --trusted-keys or "
              f"${TRUSTED_KEYS_ENV}); the folder is what the key above signed, but anyone can sign with a key of "
              "their own. Compare that fingerprint with the one the publisher gives, or pass their public key.")
        return 0 if args.allow_untrusted else 3
    if not result.publisher_verified:
        print(f"FAIL publisher: signed by key {result.signer}, which is not a trusted key "
              f"(trusted: {', '.join(result.trusted)})")
        return 3
    print(f"OK publisher verified: {result.signer} is a trusted key")
    return 0
