"""Causal depthwise conv1d in pure torch: the CPU path of ``causal_conv1d_fn`` / ``causal_conv1d_update``.

``out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]``, where inputs before the start come
from ``initial_states`` (else zero) and, in a packed row, inputs of another sequence (``seq_idx``) count as zero.
It is also the oracle for the Triton kernels. It must stay pure torch and never import triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return out
    if activation in ("silu", "swish"):
        return F.silu(out)
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
    activation: str | None = None,
):
    """``posttrain.kernels.causal_conv1d_fn`` in torch: causal depthwise conv1d, as causal-conv1d's
    ``causal_conv1d_fn``.

    x (batch, dim, seqlen), weight (dim, width), bias (dim,), seq_idx (batch, seqlen) int32 (the window never
    reaches into another sequence), initial_states (batch, dim, width - 1) (inputs before the first token, for the
    first sequence), activation None, "silu" or "swish". Returns out (batch, dim, seqlen), and the last width - 1
    inputs (batch, dim, width - 1) if ``return_final_states`` (written into ``final_states_out`` if given).
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(cdtype)
    xc = x.to(cdtype)
    if initial_states is None:
        history = xc.new_zeros(batch, dim, width - 1)
    else:
        history = initial_states.to(cdtype)
    full = torch.cat([history, xc], dim=-1)  # (b, d, width - 1 + T)
    # Sum the shifted inputs tap by tap (in a packed row, dropping taps that land in another sequence). For the
    # short widths Mamba uses this beats the CPU's depthwise convolution by an order of magnitude in backward.
    same = None
    if seq_idx is not None:
        seq = seq_idx.long()
        seq_full = torch.cat([seq[:, :1].expand(batch, width - 1), seq], dim=1)  # history belongs to sequence 1
    out = None
    for k in range(width):
        tap = w[None, :, k, None] * full[:, :, k : k + seqlen]
        if seq_idx is not None:
            same = (seq_full[:, k : k + seqlen] == seq)[:, None, :].to(cdtype)
            tap = tap * same
        out = tap if out is None else out + tap
    if bias is not None:
        out = out + bias.to(cdtype)[None, :, None]
    out = _activate(out, activation).to(x.dtype)
    if not (return_final_states or final_states_out is not None):
        return out
    final = full[:, :, -(width - 1) :].to(x.dtype) if width > 1 else x.new_zeros(batch, dim, 0)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``posttrain.kernels.causal_conv1d_update`` in torch: the decode step of the causal conv1d, as causal-conv1d's
    ``causal_conv1d_update``.

    x (batch, dim) or (batch, dim, seqlen), conv_state (batch, dim, state_len >= width - 1) updated in place
    (rows ``conv_state_indices`` when given; a ring buffer written at ``cache_seqlens % state_len`` when
    ``cache_seqlens`` is given, else shifted left). Returns out shaped like x.
    """
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state holds {state_len} steps, the kernel width {width} needs at least {width - 1}")
    if (x.dim() == 2 and cache_seqlens is None and conv_state_indices is None and state_len == width - 1
            and x.dtype == conv_state.dtype == weight.dtype == torch.float32):
        return conv_step_float32(x, conv_state, weight, bias, activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, :, None]
    batch, dim, seqlen = x.shape
    idx = None if conv_state_indices is None else conv_state_indices.long()
    state = conv_state if idx is None else conv_state[idx]  # (b, d, state_len); a copy when indexed
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if cache_seqlens is None:
        full = torch.cat([state.to(x.dtype), x], dim=-1)
        new_state = full[:, :, -state_len:]
        window = full[:, :, -(seqlen + width - 1) :]
    else:
        # conv_state is a ring buffer: the next input goes to slot cache_seqlens % state_len.
        pos = cache_seqlens.long().to(x.device)[:, None]  # (b, 1)
        back = torch.arange(-(width - 1), 0, device=x.device)[None, :]
        slots = (pos + back) % state_len  # (b, width - 1): the last width-1 inputs, oldest first
        past = torch.gather(state, 2, slots[:, None, :].expand(batch, dim, width - 1))
        window = torch.cat([past.to(x.dtype), x], dim=-1)
        write = (pos + torch.arange(seqlen, device=x.device)[None, :]) % state_len  # (b, T)
        new_state = state.clone()
        new_state.scatter_(2, write[:, None, :].expand(batch, dim, seqlen), x.to(state.dtype))
    if seqlen == 1:  # one decode step: a dot product per channel, far cheaper than a convolution call
        out = (window.to(cdtype) * weight.to(cdtype)[None]).sum(-1, keepdim=True)
    else:
        out = F.conv1d(window.to(cdtype), weight.to(cdtype)[:, None, :], None, groups=dim)
    if bias is not None:
        out = out + bias.to(cdtype)[None, :, None]
    out = _activate(out, activation).to(x.dtype)
    if idx is None:
        conv_state.copy_(new_state.to(conv_state.dtype))
    else:
        conv_state[idx] = new_state.to(conv_state.dtype)
    return out[:, :, 0] if squeeze else out


def conv_step_float32(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str | None) -> torch.Tensor:
    """One float32 decode step with a shift-left window of exactly width - 1 inputs: x (batch, dim) -> (batch, dim).

    ``out[b, d] = bias[d] + sum_k weight[d, k] * [conv_state, x][b, d, k]``, then the window drops its oldest input.
    A ``conv_state`` stored time-major (``conv_state.transpose(1, 2)`` contiguous, as ``HybridCache`` allocates it)
    takes whole time slices: the concatenation and the sum over the window run over contiguous rows, about twice
    as fast as over the innermost axis of width 4 (faster still if ``weight.t()`` is contiguous too).
    """
    if conv_state.transpose(1, 2).is_contiguous():
        state = conv_state.transpose(1, 2)  # (b, width - 1, d)
        window = torch.cat([state, x[:, None, :]], dim=1)  # (b, width, d)
        state.copy_(window[:, 1:])
        out = (window * weight.t()).sum(1)
    else:
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)  # (b, d, width)
        conv_state.copy_(window[:, :, 1:])
        out = (window * weight).sum(-1)
    if bias is not None:
        out += bias
    return _activate(out, activation)
