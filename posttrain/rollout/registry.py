"""The engines by name, and the one place a command gets its engine: ``build_engine``.

Each entry (``ENGINES``) says what the engine can do (its :class:`Capabilities`) and which model families it runs;
the family is read from the model folder's ``config.json`` (``model_type``), never chosen by the user. ``native``
is the default for the in-tree families, ``transformers`` for the others; ``vllm`` and ``server`` (a ``posttrain
vllm-serve`` at ``url``) run only on request.

A command names the config field or option the choice came from and the capabilities it needs; every bad choice
(an unknown name, an engine that cannot run the model's family, a needed capability it lacks) is an
:class:`EngineError` with a one-line message naming that field and what would work, raised by ``choose_engine``
before anything is loaded or written. Engines are imported only when built (vLLM is an optional extra).
This module never samples and never changes weights.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from posttrain.rollout.base import Capabilities, Engine, EngineError, ModuleEngine

IN_TREE_FAMILIES = ("granitemoehybrid", "granite")  # posttrain.models.hybrid.IN_TREE_MODEL_TYPES, without torch


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its name, its capabilities, the model families it runs (None: any causal LM transformers loads;
    ``server``: whatever the server runs), and how it is built (``module:function``, or ``module:Class`` of an engine
    that decodes a module in this process: on the trainer's model or a checkpoint; imported when built)."""

    name: str
    capabilities: Capabilities
    families: tuple[str, ...] | None
    builder: str
    needs_model_dir: bool = True
    # for an engine that decodes the module it is given (shares_module): the class that module must be, "in-tree"
    # (posttrain.models) or "transformers" (transformers' own class, whatever the family); None: any (a copy is made)
    module_class: str | None = None

    def runs(self, family: str) -> bool:
        return self.families is None or family in self.families

    def build(self, **kwargs: Any) -> Engine:
        module, _, name = self.builder.partition(":")
        target = getattr(importlib.import_module(module), name)
        return _build_module_engine(target, **kwargs) if isinstance(target, type) else target(**kwargs)


ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec("native", ModuleEngine.capabilities, IN_TREE_FAMILIES, "posttrain.rollout.native:NativeEngine",
               module_class="in-tree"),
    EngineSpec("transformers", ModuleEngine.capabilities, None,
               "posttrain.rollout.transformers_engine:TransformersEngine", module_class="transformers"),
    EngineSpec("vllm", Capabilities(weight_sync=True, sleep=True, close=True, prompt_logprobs=True), None,
               "posttrain.rollout.registry:_build_vllm"),
    EngineSpec("server", Capabilities(weight_sync=True, close=True), None, "posttrain.rollout.registry:_build_server",
               needs_model_dir=False),
)}

ENGINE_NAMES = tuple(ENGINES)
CAPABILITY_NAMES = tuple(f.name for f in fields(Capabilities))

# what each capability means to a person reading an error
_CAPABILITY_WORDS = {
    "weight_sync": "take the trainer's weights after each step (weight_sync)",
    "sleep": "sleep between rollouts (sleep)",
    "streaming": "stream tokens as they are sampled (streaming)",
    "close": "be closed (close)",
    "shares_module": "decode with the trainer's own module in this process (shares_module)",
    "prompt_logprobs": "score the prompt's own tokens (prompt_logprobs)",
}


def model_family(model_dir: str | os.PathLike, field: str = "model.path") -> str:
    """The ``model_type`` of the checkpoint in ``model_dir``; errors name the field and the file."""
    from posttrain.families import read_model_type

    return read_model_type(model_dir, field)[0]


def default_engine(family: str) -> str:
    """``native`` for the in-tree families, ``transformers`` for every other one."""
    return "native" if ENGINES["native"].runs(family) else "transformers"


def _names(specs: Iterable[EngineSpec]) -> str:
    return ", ".join(s.name for s in specs) or "none"


def choose_engine(name: str | None, model_dir: str | os.PathLike | None, *, field: str, needs: Iterable[str] = (),
                  family: str | None = None) -> EngineSpec:
    """The engine ``name`` (None: the default for the model's family) for the model in ``model_dir`` (or of
    ``family``, for a model given as an object), checked: an :class:`EngineError` naming ``field`` for an unknown
    name, a family the engine cannot run, or a capability in ``needs`` it lacks. Reads only ``config.json``; loads
    nothing."""
    needs = list(needs)
    unknown = [n for n in needs if n not in CAPABILITY_NAMES]
    if unknown:  # a caller's mistake, not the user's
        raise ValueError(f"unknown capabilities {unknown}; known: {', '.join(CAPABILITY_NAMES)}")
    if name is not None and name not in ENGINES:
        raise EngineError(f"{field}: unknown engine {name!r}; the engines are {', '.join(ENGINE_NAMES)}")
    if family is None and model_dir is not None and (name is None or ENGINES[name].needs_model_dir):
        family = model_family(model_dir)
    if name is None:
        if family is None:
            raise EngineError(f"{field}: no engine given and no model folder to choose one for")
        name = default_engine(family)
    spec = ENGINES[name]
    if family is not None and not spec.runs(family):
        able = [s for s in ENGINES.values() if s.needs_model_dir and s.runs(family)]
        where = f"{Path(model_dir) / 'config.json'} has" if model_dir is not None else "the model has"
        raise EngineError(f"{field}: engine {name!r} runs only {', '.join(spec.families or ())} models, and "
                          f"{where} model_type {family!r}; engines that run it: {_names(able)}")
    check_capabilities(spec, needs, field, family)
    return spec


def build_engine(name: str | None, model_dir: str | os.PathLike | None = None, *, field: str,
                 needs: Iterable[str] = (), family: str | None = None, model: Any = None, tokenizer: Any = None,
                 device: str = "auto", dtype: str = "auto", max_num_seqs: int = 256, seed: int = 0,
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.9, sleep_mode: bool = False,
                 url: str | None = None, timeout_s: float = 600.0, processes: int = 1,
                 sync_group: Any = None) -> Engine:
    """The engine ``name`` (None: the default for the family) for ``model_dir``, checked by :func:`choose_engine`
    first, then built: on ``model`` when given (the trainer's policy, which in-process engines decode as it is),
    else on the checkpoint in ``model_dir`` (``device``/``dtype`` ``"auto"``: CUDA when present, the checkpoint's
    dtype there and float32 on the CPU). vLLM reads ``max_model_len``, ``gpu_memory_utilization``, ``sleep_mode``
    and ``seed``; a server ``url``, ``timeout_s``, and ``sync_group`` (a ``SyncGroupConfig``: the trainer's
    broadcast group it is asked to join; one trainer process only, ``processes``)."""
    spec = choose_engine(name, model_dir, field=field, needs=needs, family=family)
    engine = spec.build(model_dir=model_dir, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                        max_num_seqs=max_num_seqs, seed=seed, max_model_len=max_model_len,
                        gpu_memory_utilization=gpu_memory_utilization, sleep_mode=sleep_mode, url=url,
                        timeout_s=timeout_s, field=field, processes=processes, sync_group=sync_group)
    if engine.capabilities != spec.capabilities:  # the registry promised what the engine declares
        raise RuntimeError(f"engine {spec.name!r} declares {engine.capabilities}, the registry {spec.capabilities}")
    return engine


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype | None]:
    """``"auto"``: CUDA when present; on CUDA the checkpoint's dtype (None), on the CPU float32."""
    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        return resolved, None if resolved.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return resolved, table[dtype]


# -- builders (imported by name from ENGINES, so an engine's module loads only when it is built) ---------------------
def _build_module_engine(engine_class, *, model_dir, model, device, dtype, max_num_seqs, **_: Any) -> Engine:
    if model is not None:
        return engine_class(model, max_num_seqs=max_num_seqs)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    return engine_class.from_pretrained(model_dir, device=device, dtype=torch_dtype, max_num_seqs=max_num_seqs)


def _build_vllm(*, model_dir, model, tokenizer, dtype, seed, max_model_len, gpu_memory_utilization, sleep_mode,
                field, **_: Any) -> Engine:
    from posttrain.rollout.vllm import VllmEngine

    options = {"gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len, "seed": seed,
               "sleep_mode": sleep_mode, "field": field, "alternatives": _alternatives(model_dir)}
    if model is not None:  # dtype "auto": the policy's own (a trainer under bf16 autocast says bfloat16)
        return VllmEngine.for_policy(model, tokenizer, **options, **({} if dtype == "auto" else {"dtype": dtype}))
    return VllmEngine(model_dir, dtype=dtype, **options)  # vLLM reads "auto" as the checkpoint's dtype


def _build_server(*, url, timeout_s, field, processes, sync_group, **_: Any) -> Engine:
    from posttrain.rollout.remote import RemoteEngine

    if not url:
        raise EngineError(f"{field}: the server engine needs the URL of a posttrain vllm-serve")
    if processes > 1:
        raise EngineError(f"{field}: server supports one training process for now")
    engine = RemoteEngine(url, timeout_s=timeout_s)
    if sync_group is not None:
        engine.init_weight_sync(sync_group)
    return engine


def _alternatives(model_dir) -> str:
    """What to use instead of vLLM for this model: its default engine."""
    if model_dir is None:
        return "native or transformers"
    try:
        return default_engine(model_family(model_dir))
    except (OSError, ValueError, RuntimeError):  # no or a bad config.json: say both
        return "native or transformers"


def check_capabilities(engine: Engine | EngineSpec, needs: Iterable[str], field: str, family: str | None = None
                       ) -> None:
    """An :class:`EngineError` naming ``field`` if ``engine`` (built, or a registry entry) lacks a capability in
    ``needs``, naming the engines that have it (and run ``family``, when known)."""
    for need in needs:
        if not getattr(engine.capabilities, need):
            able = [s for s in ENGINES.values() if getattr(s.capabilities, need)
                    and (family is None or not s.needs_model_dir or s.runs(family))]
            raise EngineError(f"{field}: engine {engine.name!r} cannot {_CAPABILITY_WORDS[need]}, which this needs; "
                              f"engines that can: {_names(able)}")

