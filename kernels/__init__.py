"""posttrain.kernels: the hybrid model's kernels, Triton on CUDA and pure torch elsewhere, behind one dispatch point.

Public functions (signatures compatible with mamba_ssm and causal-conv1d, so code written against them runs here):

- ``mamba_chunk_scan_combined``: Mamba-2 SSD over a sequence (training, prefill), forward and backward;
- ``selective_state_update``: one Mamba-2 decode step;
- ``causal_conv1d_fn`` / ``causal_conv1d_update``: causal depthwise conv1d and its decode step;
- ``rms_norm_gated``: RMSNorm of ``x * silu(z)`` by groups of channels;
- ``fused_linear_logprobs``: per-token log-probabilities (and entropy) from hidden states and the LM head without
  materialising the logits.

Each public function has the signature and documentation of its torch path (``*_torch.py``, the CPU path); the
Triton function beside it (``*_triton.py``) takes the same arguments. Each call picks the Triton kernel for CUDA
tensors and the torch path otherwise; the environment variable ``POSTTRAIN_KERNELS=torch|triton`` forces one
(``triton`` on CPU runs Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported: that is
how the tests check the kernels on CPU).
The package imports without triton installed. Installed as ``posttrain.kernels``; never import it as a
top-level ``kernels`` module (that name is Hugging Face's own package).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from posttrain.kernels.conv1d_torch import causal_conv1d_torch, causal_conv1d_update_torch
from posttrain.kernels.logprobs_torch import chunked_linear_logprobs_torch, naive_linear_logprobs
from posttrain.kernels.rmsnorm_torch import rms_norm_gated_torch
from posttrain.kernels.ssd_torch import selective_state_update_torch, ssd_chunked_torch

__all__ = [
    "backend_for",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "fused_linear_logprobs",
    "mamba_chunk_scan_combined",
    "naive_linear_logprobs",
    "rms_norm_gated",
    "selective_state_update",
    "triton_available",
]

ENV_BACKEND = "POSTTRAIN_KERNELS"


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported here (it is absent on some CPU machines)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the backend a call on ``tensor`` takes (``POSTTRAIN_KERNELS`` overrides)."""
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced in ("torch", "triton"):
        if forced == "triton" and not triton_available():
            raise RuntimeError(f"{ENV_BACKEND}=triton but triton is not installed")
        return forced
    if forced:
        raise ValueError(f"{ENV_BACKEND} must be 'torch' or 'triton', got {forced!r}")
    return "triton" if tensor.is_cuda and triton_available() else "torch"


P = ParamSpec("P")
R = TypeVar("R")


def _check_triton_device(tensor: torch.Tensor) -> None:
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{ENV_BACKEND}=triton on a {tensor.device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, or use CUDA tensors"
        )


def _dispatched(name: str, torch_impl: Callable[P, R], triton_module: str, triton_name: str, on: str) -> Callable[P, R]:
    """The public function ``name``: the signature and documentation of ``torch_impl``, which a call runs unless
    ``backend_for`` its tensor argument ``on`` says triton; then it runs ``triton_name`` of
    ``posttrain.kernels.<triton_module>`` (imported only then), with the same arguments."""
    position = list(inspect.signature(torch_impl).parameters).index(on)

    @functools.wraps(torch_impl)
    def dispatch(*args: P.args, **kwargs: P.kwargs) -> R:
        if len(args) > position:
            tensor = args[position]
        elif on in kwargs:
            tensor = kwargs[on]
        else:
            raise TypeError(f"{name}() missing required argument: '{on}'")
        if backend_for(tensor) != "triton":
            return torch_impl(*args, **kwargs)
        _check_triton_device(tensor)
        return getattr(importlib.import_module(f"posttrain.kernels.{triton_module}"), triton_name)(*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__module__ = __name__
    return dispatch


mamba_chunk_scan_combined = _dispatched("mamba_chunk_scan_combined", ssd_chunked_torch, "ssd_triton",
                                        "ssd_chunked_triton", on="x")
selective_state_update = _dispatched("selective_state_update", selective_state_update_torch, "ssd_triton",
                                     "selective_state_update_triton", on="x")
causal_conv1d_fn = _dispatched("causal_conv1d_fn", causal_conv1d_torch, "conv1d_triton", "causal_conv1d_triton",
                               on="x")
causal_conv1d_update = _dispatched("causal_conv1d_update", causal_conv1d_update_torch, "conv1d_triton",
                                   "causal_conv1d_update_triton", on="x")
rms_norm_gated = _dispatched("rms_norm_gated", rms_norm_gated_torch, "rmsnorm_triton", "rms_norm_gated_triton", on="x")
fused_linear_logprobs = _dispatched("fused_linear_logprobs", chunked_linear_logprobs_torch, "logprobs_triton",
                                    "fused_linear_logprobs_triton", on="hidden")
