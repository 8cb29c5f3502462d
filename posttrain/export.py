"""``posttrain export``: turn a trained model into a signed instruct checkpoint a user can ship.

The export folder is a Hugging Face checkpoint (``model.safetensors``, ``config.json``, ``generation_config.json``,
the tokenizer with its chat template) that loads in transformers (``GraniteMoeHybridForCausalLM`` for the hybrid,
the checkpoint's own class for any other causal LM, with no missing or unexpected keys) and in vLLM, plus:

- ``manifest.json``: the SHA-256 and size of every other file, and the provenance of the run (the training
  manifest: recipe, data files and the manifests beside them with their hashes, the base checkpoint's hash), the
  source checkpoint's and adapter's hashes;
- ``manifest.sig``: an Ed25519 signature (``cryptography``) of ``manifest.json``'s exact bytes, base64;
- ``signing_key.pub``: the public key (PEM), named in the manifest by its fingerprint (``key_fingerprint``). It
  proves only that the files are the ones its holder signed; who published them is ``posttrain verify``'s question.

A LoRA adapter (``--adapter``, a peft folder) is merged into the weights first. Everything is written under a
temporary name and renamed. This module never trains and never overwrites a private key.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from posttrain.provenance import bytes_digest, file_digest, new_folder, weights_digest, write_manifest

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_KEY = "signing_key.pub"
FORMAT = "posttrain-export/1"
UNSIGNED = {MANIFEST, SIGNATURE, PUBLIC_KEY}


class ExportError(ValueError):
    """An export that cannot be made (no chat template, bad key, missing files); the message says which."""


# -- keys ------------------------------------------------------------------------------------------------------
def generate_key(path: str | os.PathLike) -> None:
    """Write a new Ed25519 private key (PEM, mode 0600); refuses to overwrite an existing file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if path.exists():
        raise ExportError(f"{path} exists; refusing to overwrite a key")
    if not path.parent.is_dir():
        raise ExportError(f"--key {path}: folder {path.parent} does not exist (create it first)")
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"signing key not found: {path} (create one with --generate-key)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ExportError(f"{path}: an Ed25519 key is needed, got {type(key).__name__}")
    return key


def public_pem(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_key) -> str:
    """The name of an Ed25519 public key (a key object or its PEM): SHA-256 of its raw 32 bytes, hex. The manifest
    names its signing key by it and ``posttrain verify`` prints it."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(public_key, bytes):
        public_key = serialization.load_pem_public_key(public_key)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bytes_digest(raw)


# -- export ----------------------------------------------------------------------------------------------------
def export_checkpoint(model_dir: str | os.PathLike, out: str | os.PathLike, key_path: str | os.PathLike, *,
                      adapter: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
                      recipe: str | os.PathLike | None = None) -> Path:
    import torch
    from transformers import GenerationConfig

    from posttrain.provenance import TRAINING_MANIFEST
    from posttrain.tokenizer import load_tokenizer
    from posttrain.train.run import is_hybrid_folder

    model_dir, out = Path(model_dir), Path(out)
    key = load_private_key(key_path)  # fail on a bad key before any work
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"--model {model_dir}: no checkpoint there (no config.json)")
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    if not tokenizer.chat_template:
        raise ExportError(f"the tokenizer in {tokenizer_dir or model_dir} has no chat template; an instruct "
                          "checkpoint needs one")
    if is_hybrid_folder(model_dir):
        from posttrain.models.hybrid import HybridForCausalLM

        model = HybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        from posttrain.families import check_trainable, load_causal_lm

        check_trainable(model_dir, "--model")
        model = load_causal_lm(model_dir, "--model")
    provenance: dict[str, Any] = {"source": {"path": str(model_dir.resolve()), "sha256": weights_digest(model_dir)}}
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ExportError(f"--adapter {adapter}: no adapter_config.json (not a peft adapter folder)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        provenance["adapter"] = {"path": str(adapter.resolve()),
                                 "sha256": {p.name: file_digest(p) for p in sorted(adapter.iterdir()) if p.is_file()}}
    training = model_dir / TRAINING_MANIFEST
    if training.is_file():
        provenance["training"] = json.loads(training.read_text())
        provenance["training_manifest_sha256"] = file_digest(training)
    if recipe is not None:
        provenance["recipe"] = {"path": str(Path(recipe).resolve()), "sha256": file_digest(recipe),
                                "text": Path(recipe).read_text()}
    merge = model_dir / "merge_manifest.json"
    if merge.is_file():
        provenance["merge"] = json.loads(merge.read_text())

    with new_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        cfg = model.config
        GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                         bos_token_id=cfg.bos_token_id).save_pretrained(str(tmp))
        write_manifest_and_sign(tmp, key, provenance)
    return out


def signed_files(folder: Path) -> dict[str, Path]:
    """The files of ``folder`` its manifest lists (all but the manifest, its signature and the key), by relative path."""
    paths = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return {rel: p for rel, p in paths.items() if rel not in UNSIGNED}


def write_manifest_and_sign(folder: Path, private_key, provenance: dict[str, Any]) -> None:
    files = {rel: {"sha256": file_digest(p), "size": p.stat().st_size} for rel, p in signed_files(folder).items()}
    pub = public_pem(private_key)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "signature": {"algorithm": "ed25519", "public_key_sha256": key_fingerprint(pub)},
                "files": files, "provenance": provenance}
    body = write_manifest(folder / MANIFEST, manifest)
    (folder / SIGNATURE).write_text(base64.b64encode(private_key.sign(body)).decode() + "\n")
    (folder / PUBLIC_KEY).write_bytes(pub)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the trained checkpoint (e.g. RUN/final)")
    parser.add_argument("--out", required=True, help="folder to write the instruct checkpoint to")
    parser.add_argument("--key", required=True, help="Ed25519 private key (PEM) to sign with")
    parser.add_argument("--generate-key", action="store_true", help="create --key first (refuses to overwrite)")
    parser.add_argument("--adapter", help="a peft LoRA adapter folder to merge into --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--recipe", help="the recipe the model was trained with (recorded in the manifest)")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import ConfigError
    from posttrain.families import ModelFamilyError
    from posttrain.models.hybrid import CheckpointError as WeightsError  # weights not matching config.json

    try:
        if args.generate_key:
            generate_key(args.key)
        out = export_checkpoint(args.model, args.out, args.key, adapter=args.adapter, tokenizer_dir=args.tokenizer,
                                recipe=args.recipe)
    except (ExportError, ModelFamilyError, WeightsError, ConfigError, FileNotFoundError) as e:
        print(f"posttrain export: {e}", file=sys.stderr)
        return 2
    print(f"exported and signed {out} with key {key_fingerprint((out / PUBLIC_KEY).read_bytes())}; check it with: "
          f"posttrain verify {out} --public-key PUBLIC.pem (your public key; write it with "
          "`openssl pkey -in KEY.pem -pubout`)")
    return 0
