"""Reading and writing in-tree checkpoints in the Hugging Face layout: config.json plus safetensors (sharded with
an index when large), tensor names exactly as published Granite 4.0-H (``granitemoehybrid``) and dense Granite
(``granite``) checkpoints have them; the config's ``model_type`` says which.

Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it. A missing weight is never
silently initialised at random. Files are written under temporary names and renamed, so a crash never leaves a
half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.models.hybrid.configuration import load_config
from posttrain.provenance import write_manifest

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the configuration. The message names the tensors."""


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a checkpoint of ``model`` holds (tied lm_head left out, as transformers does)."""
    tied = model.config.tie_word_embeddings
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}


def save_checkpoint(model: torch.nn.Module, folder: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from posttrain.families import checkpoint_state  # LoRA adapters applied, under the base layers' names

    state = {k: v.detach().contiguous() for k, v in checkpoint_state(model).items() if k in expected_tensors(model)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    metadata = {"format": "pt"}
    # remove files of an earlier save in another layout, so a reader never mixes the two
    for old in list(folder.glob("model-*-of-*.safetensors")) + [folder / SINGLE_FILE, folder / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SINGLE_FILE, metadata)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / fname, metadata)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        write_manifest(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    model.config.save(folder)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        return {name: folder / fname for name, fname in index["weight_map"].items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), "pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def load_checkpoint(cls, folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
    folder = Path(folder)
    config = load_config(folder)
    with torch.device("meta"):
        model = cls(config)
    expected = expected_tensors(model)
    files = checkpoint_files(folder)
    if config.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some writers keep the tied copy; the embedding is the one we use
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
                        + f" (in none of {', '.join(sorted({p.name for p in files.values()}))})")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(f'{n} (in {files[n].name})' for n in unexpected[:10])}"
                        + (" ..." if len(unexpected) > 10 else ""))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name in expected:
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), "pt", device="cpu") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    problems.append(f"tensor {name} in {path.name} has shape {list(shape)}, "
                                    f"the config expects {list(expected[name])}")
                    continue
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[name] = t.to(device) if device is not None else t
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match its config.json: " + "; ".join(problems))
    return _assign(model, state)


def save_state(cls, config, state: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """Save a full state dict (gathered from any sharding) as a checkpoint of the in-tree model ``cls``, in float32."""
    with torch.device("meta"):
        model = cls(config)
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in state.items()}
    _assign(model, state).save_pretrained(folder)


def _assign(model, state: dict[str, torch.Tensor]):
    """``model`` (built on the meta device) holding ``state``; a tied output layer is the embedding itself."""
    tied = model.config.tie_word_embeddings
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
