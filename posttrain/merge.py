"""``posttrain merge``: linear and SLERP merges of checkpoints of one architecture.

Granite 4.x merges the model after each context-extension stage; ``run_stages`` in ``posttrain.train.run`` calls
``merge_checkpoints`` for it. Any HF-format checkpoints with identical tensor names and shapes merge (the in-tree
hybrid, or any transformers model): the weight files are read with safetensors, combined tensor by tensor in
float32, and written with the first checkpoint's config, generation config and tokenizer, plus
``merge_manifest.json`` (sources, their hashes, method, weights). Integer tensors must be equal in every source.
Output is written to a temporary folder and renamed. This module never trains and never changes its inputs.

- ``linear``: sum_i w_i * theta_i (weights default to equal shares; they need not sum to 1).
- ``slerp``: two checkpoints, ``t`` the share of the second: each tensor moves along the great circle between the
  two (angle measured on the flattened, normalised tensors), falling back to linear when they are near parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.models.hybrid.checkpoint import SINGLE_FILE, checkpoint_files
from posttrain.provenance import new_folder, weights_digest, write_manifest

_CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class MergeError(ValueError):
    """Checkpoints that cannot be merged (different architectures, bad weights); the message names the tensor."""


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        files = checkpoint_files(Path(folder))
    except FileNotFoundError as e:
        raise MergeError(str(e)) from None
    out: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                out[key] = f.get_tensor(key)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape (float32 math)."""
    a32, b32 = a.float().flatten(), b.float().flatten()
    na, nb = a32.norm(), b32.norm()
    cos = None if na < eps or nb < eps else torch.clamp(torch.dot(a32 / na, b32 / nb), -1.0, 1.0)
    if cos is None or cos.abs() > 1 - 1e-6:  # a zero tensor, or (anti)parallel ones: the line is the same path
        return ((1 - t) * a32 + t * b32).view_as(a)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    mixed = (torch.sin((1 - t) * omega) / so) * a32 + (torch.sin(t * omega) / so) * b32
    return mixed.view_as(a)


def merge_state(states: list[dict[str, torch.Tensor]], method: Literal["linear", "slerp"],
                weights: list[float] | None = None, t: float = 0.5,
                names: list[str] | None = None) -> dict[str, torch.Tensor]:
    names = names or [f"checkpoint {i}" for i in range(len(states))]
    if len(states) < 2:
        raise MergeError("merging needs at least two checkpoints")
    keys = set(states[0])
    for s, name in zip(states[1:], names[1:]):
        if set(s) != keys:
            diff = sorted(keys ^ set(s))
            raise MergeError(f"{name} is not the architecture of {names[0]}: tensor {diff[0]} is in one only")
        for k in keys:
            if s[k].shape != states[0][k].shape:
                raise MergeError(f"{name}: tensor {k} has shape {list(s[k].shape)}, {names[0]} has "
                                 f"{list(states[0][k].shape)}")
    if method == "slerp":
        if len(states) != 2:
            raise MergeError(f"slerp merges exactly two checkpoints, got {len(states)}")
        if not 0.0 <= t <= 1.0:
            raise MergeError(f"slerp t must be in [0, 1], got {t}")
    elif method == "linear":
        weights = weights if weights is not None else [1.0 / len(states)] * len(states)
        if len(weights) != len(states):
            raise MergeError(f"{len(weights)} weights for {len(states)} checkpoints")
    else:
        raise MergeError(f"unknown merge method {method!r}: linear or slerp")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(keys):
        tensors = [s[k] for s in states]
        if not tensors[0].is_floating_point():
            if any(not torch.equal(tensors[0], x) for x in tensors[1:]):
                raise MergeError(f"integer tensor {k} differs between checkpoints; cannot merge it")
            out[k] = tensors[0].clone()
            continue
        if method == "slerp":
            merged = slerp(tensors[0], tensors[1], t)
        else:
            merged = sum(w * x.float() for w, x in zip(weights, tensors))
        out[k] = merged.to(tensors[0].dtype).contiguous()
    return out


def merge_checkpoints(folders: list[str | os.PathLike], out: str | os.PathLike,
                      method: Literal["linear", "slerp"] = "linear", weights: list[float] | None = None,
                      t: float = 0.5) -> Path:
    """Merge checkpoint folders into ``out`` (config, generation config and tokenizer from the first)."""
    folders = [Path(f) for f in folders]
    configs = []
    for f in folders:
        cfg = f / "config.json"
        if not cfg.is_file():
            raise MergeError(f"{f}: no config.json")
        configs.append(json.loads(cfg.read_text()))
    arch = [c.get("model_type") for c in configs]
    if len(set(arch)) != 1:
        raise MergeError(f"checkpoints of different model types cannot merge: {arch}")
    merged = merge_state([read_weights(f) for f in folders], method, weights, t, [str(f) for f in folders])
    out = Path(out)
    with new_folder(out) as tmp:
        save_file(merged, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        for name in _CARRIED:
            if (folders[0] / name).is_file():
                shutil.copy2(folders[0] / name, tmp / name)
        manifest = {"method": method, "weights": weights if method == "linear" else None,
                    "t": t if method == "slerp" else None,
                    "sources": [{"path": str(f.resolve()), "sha256": weights_digest(f)} for f in folders]}
        write_manifest(tmp / "merge_manifest.json", manifest)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="checkpoint folders of one architecture")
    parser.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    parser.add_argument("--method", choices=["linear", "slerp"], default="linear")
    parser.add_argument("--weights", type=float, nargs="+", help="linear: one weight per model (default: equal)")
    parser.add_argument("--t", type=float, default=0.5, help="slerp: share of the second model, 0..1")


def run(args: argparse.Namespace) -> int:
    try:
        out = merge_checkpoints(args.models, args.out, args.method, args.weights, args.t)
    except (MergeError, FileNotFoundError) as e:
        print(f"posttrain merge: {e}")
        return 2
    print(f"wrote the {args.method} merge of {len(args.models)} checkpoints to {out}")
    return 0
