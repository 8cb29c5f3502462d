"""posttrain.kernels: the hybrid model's kernels, Triton on CUDA and pure torch elsewhere, behind one dispatch point.

Public functions (signatures compatible with mamba_ssm and causal-conv1d, so code written against them runs here):

- ``mamba_chunk_scan_combined``: Mamba-2 SSD over a sequence (training, prefill), forward and backward;
- ``selective_state_update``: one Mamba-2 decode step;
- ``causal_conv1d_fn`` / ``causal_conv1d_update``: causal depthwise conv1d and its decode step;
- ``rms_norm_gated``: RMSNorm of ``x * silu(z)`` by groups of channels;
- ``fused_linear_logprobs``: per-token log-probabilities (and entropy) from hidden states and the LM head without
  materialising the logits.

Each call picks the Triton kernel for CUDA tensors and the torch path otherwise; the environment variable
``POSTTRAIN_KERNELS=torch|triton`` forces one (``triton`` on CPU runs Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported: that is how the tests check the kernels on CPU).
The package imports without triton installed. Installed as ``posttrain.kernels``; never import it as a
top-level ``kernels`` module (that name is Hugging Face's own package).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

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


def _check_triton_device(tensor: torch.Tensor) -> None:
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{ENV_BACKEND}=triton on a {tensor.device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported, or use CUDA tensors"
        )


def _implementation(tensor: torch.Tensor, torch_impl: Callable, triton_module: str, triton_name: str) -> Callable:
    """The function a call on ``tensor`` runs: ``torch_impl``, or on the triton backend ``triton_name`` of
    ``posttrain.kernels.<triton_module>`` (imported only then)."""
    if backend_for(tensor) != "triton":
        return torch_impl
    _check_triton_device(tensor)
    return getattr(importlib.import_module(f"posttrain.kernels.{triton_module}"), triton_name)


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2 SSD (chunked state space duality) over whole sequences, as mamba_ssm's function of that name.

    x (batch, seqlen, nheads, headdim), dt (batch, seqlen, nheads), A (nheads,), B and C (batch, seqlen, ngroups,
    dstate) (head h reads group h // (nheads // ngroups)), D (nheads,) or (nheads, headdim), z like x (out *=
    silu(z)), dt_bias (nheads,), initial_states (batch, nheads, headdim, dstate), seq_idx (batch, seqlen) int32
    (packed sequences: the state restarts at zero where it changes; initial_states reach the first sequence
    only), cu_seqlens (num_seqs + 1,) int32 (only for ``return_varlen_states``, batch 1). dt becomes
    softplus(dt + dt_bias) if ``dt_softplus``, clamped to ``dt_limit``. Any seqlen.

    Returns out (batch, seqlen, nheads, headdim) in x's dtype, then final_states (batch, nheads, headdim, dstate)
    if ``return_final_states``, then varlen_states (num_seqs, nheads, headdim, dstate) if
    ``return_varlen_states``; states are float32.
    """
    impl = _implementation(x, ssd_chunked_torch, "ssd_triton", "ssd_chunked_triton")
    return impl(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
                cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
                return_final_states=return_final_states, return_varlen_states=return_varlen_states)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba-2 decode step, as mamba_ssm's ``selective_state_update`` (multi-head shapes).

    state (batch, nheads, headdim, dstate) float32, updated in place (rows ``state_batch_indices`` when given),
    x (batch, nheads, headdim), dt (batch, nheads, headdim), A (nheads, headdim, dstate), B and C (batch,
    ngroups, dstate), D (nheads, headdim), z like x, dt_bias (nheads, headdim). Returns out (batch, nheads,
    headdim) in x's dtype. The head axis may be left out everywhere, as in mamba_ssm.
    """
    impl = _implementation(x, selective_state_update_torch, "ssd_triton", "selective_state_update_triton")
    return impl(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                state_batch_indices=state_batch_indices)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
):
    """Causal depthwise conv1d, as causal-conv1d's ``causal_conv1d_fn``.

    x (batch, dim, seqlen), weight (dim, width), bias (dim,), seq_idx (batch, seqlen) int32 (the window never
    reaches into another sequence), initial_states (batch, dim, width - 1) (inputs before the first token, for the
    first sequence), activation None, "silu" or "swish". Returns out (batch, dim, seqlen), and the last width - 1
    inputs (batch, dim, width - 1) if ``return_final_states`` (written into ``final_states_out`` if given).
    """
    impl = _implementation(x, causal_conv1d_torch, "conv1d_triton", "causal_conv1d_triton")
    return impl(x, weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                return_final_states=return_final_states, final_states_out=final_states_out, activation=activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode step of the causal conv1d, as causal-conv1d's ``causal_conv1d_update``.

    x (batch, dim) or (batch, dim, seqlen), conv_state (batch, dim, state_len >= width - 1) updated in place
    (rows ``conv_state_indices`` when given; a ring buffer written at ``cache_seqlens % state_len`` when
    ``cache_seqlens`` is given, else shifted left). Returns out shaped like x.
    """
    impl = _implementation(x, causal_conv1d_update_torch, "conv1d_triton", "causal_conv1d_update_triton")
    return impl(x, conv_state, weight, bias=bias, activation=activation, cache_seqlens=cache_seqlens,
                conv_state_indices=conv_state_indices)


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMSNorm: RMSNorm of ``x * silu(z)`` over groups of ``group_size`` channels (None: the whole last dim),
    times ``weight`` (``norm_before_gate=True``: gate after the norm). Float32 inside, returned in x's dtype."""
    impl = _implementation(x, rms_norm_gated_torch, "rmsnorm_triton", "rms_norm_gated_triton")
    return impl(x, weight, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    logits_scaling: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Log-probability of each target under ``hidden @ weight.T / logits_scaling / temperature``, chunked.

    hidden (N, H) (or (..., H)), weight (V, H), targets (N,) (or (...)). Returns float32 log-probs shaped like
    targets (0 where target == ignore_index), and the entropy of each token's distribution (also 0 there) if
    ``return_entropy``. Forward and backward run over ``chunk_size`` tokens at a time (None: at most 48M logits
    per chunk, 448 tokens for a 100K vocabulary), recomputing the logits in backward, so the (N, V) logits never exist at once.
    Gradients reach hidden and weight.
    """
    impl = _implementation(hidden, chunked_linear_logprobs_torch, "logprobs_triton", "fused_linear_logprobs_triton")
    return impl(hidden, weight, targets, temperature=temperature, logits_scaling=logits_scaling, chunk_size=chunk_size,
                return_entropy=return_entropy, ignore_index=ignore_index)
