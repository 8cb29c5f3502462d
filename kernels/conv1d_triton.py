"""Causal depthwise conv1d in Triton: the GPU path of ``causal_conv1d_fn`` (forward and backward) and
``causal_conv1d_update`` (decode step, no autograd).

``pre[t] = bias + sum_k w[k] x[t - (width - 1) + k]`` with the history before t = 0 taken from ``initial_states``
(for the first sequence of the row only) and taps in another sequence (``seq_idx``) counted as zero;
``out = silu(pre)`` or ``pre``. The backward recomputes ``pre`` where it needs it (width is small) instead of
saving it: each program owns a block of positions, computes ``d pre`` there for the weight and bias partial sums,
and ``dx[t] = sum_k w[k] d pre[t + width - 1 - k]`` (same sequence), reading ``d pre`` a few positions ahead.
Triton is imported here unconditionally: only the dispatcher may import this module, once triton is known to be
available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tap_value(X, INIT, SEQ, b, offs_d, j, seq_u, T, dim, sxb, sxd, sxt, sib, sid, sit,
               W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):  # fmt: skip
    """x at positions j (BT,) for channels offs_d (BD,), zero outside the row or in another sequence than seq_u."""
    md = offs_d < dim
    inside = (j >= 0) & (j < T)
    v = tl.load(X + b * sxb + offs_d[:, None] * sxd + j[None, :] * sxt, mask=md[:, None] & inside[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        before = (j < 0) & (j >= -(W - 1))
        hist = tl.load(
            INIT + b * sib + offs_d[:, None] * sid + (j + W - 1)[None, :] * sit,
            mask=md[:, None] & before[None, :],
            other=0.0,
        )
        v += hist.to(tl.float32)
    if HAS_SEQ:
        seq_j = tl.load(SEQ + b * T + tl.maximum(tl.minimum(j, T - 1), 0))
        v = tl.where((seq_j == seq_u)[None, :], v, 0.0)
    return v


@triton.jit
def _pre_activation(X, WT, BIAS, INIT, SEQ, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                    HAS_SEQ: tl.constexpr):  # fmt: skip
    md = offs_d < dim
    seq_u = 0
    if HAS_SEQ:
        seq_u = tl.load(SEQ + b * T + tl.maximum(tl.minimum(u, T - 1), 0))
    acc = tl.zeros((offs_d.shape[0], u.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(WT + offs_d * swd + k * swk, mask=md, other=0.0).to(tl.float32)
        j = u - (W - 1) + k
        acc += wk[:, None] * _tap_value(X, INIT, SEQ, b, offs_d, j, seq_u, T, dim, sxb, sxd, sxt, sib, sid, sit,
                                        W, HAS_INIT, HAS_SEQ)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=md, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _conv_fwd_kernel(
    X, WT, BIAS, INIT, SEQ, OUT,
    T, dim,
    sxb, sxd, sxt, sib, sid, sit, swd, swk, sob, sod, sot,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    u = tl.program_id(2) * BT + tl.arange(0, BT)
    pre = _pre_activation(X, WT, BIAS, INIT, SEQ, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
                          W, HAS_BIAS, HAS_INIT, HAS_SEQ)  # fmt: skip
    if SILU:
        pre = pre * tl.sigmoid(pre)
    mask = (offs_d < dim)[:, None] & (u < T)[None, :]
    tl.store(OUT + b * sob + offs_d[:, None] * sod + u[None, :] * sot, pre.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dpre(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk, sgb, sgd, sgt,
          W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
          SILU: tl.constexpr):  # fmt: skip
    """d loss / d pre at positions u (zero outside [0, T))."""
    mask = (offs_d < dim)[:, None] & ((u >= 0) & (u < T))[None, :]
    g = tl.load(DOUT + b * sgb + offs_d[:, None] * sgd + u[None, :] * sgt, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(X, WT, BIAS, INIT, SEQ, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
                              W, HAS_BIAS, HAS_INIT, HAS_SEQ)  # fmt: skip
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _dx_at(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, t, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk, sgb, sgd, sgt,
           W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
           SILU: tl.constexpr):  # fmt: skip
    """dx[t] = sum_k w[k] d pre[t + W - 1 - k], for the taps where position t is in the output's sequence."""
    md = offs_d < dim
    seq_t = 0
    if HAS_SEQ:
        seq_t = tl.load(SEQ + b * T + tl.maximum(tl.minimum(t, T - 1), 0))
    acc = tl.zeros((offs_d.shape[0], t.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        u = t + (W - 1) - k
        g = _dpre(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
                  sgb, sgd, sgt, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU)  # fmt: skip
        if HAS_SEQ:
            seq_u = tl.load(SEQ + b * T + tl.maximum(tl.minimum(u, T - 1), 0))
            g = tl.where((seq_u == seq_t)[None, :], g, 0.0)
        wk = tl.load(WT + offs_d * swd + k * swk, mask=md, other=0.0).to(tl.float32)
        acc += wk[:, None] * g
    return acc


@triton.jit
def _conv_bwd_kernel(
    X, WT, BIAS, INIT, SEQ, DOUT, DX, DW_PART, DB_PART, DINIT,
    T, dim, ntb,
    sxb, sxd, sxt, sib, sid, sit, swd, swk, sgb, sgd, sgt,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_d = pid_d * BD + tl.arange(0, BD)
    md = offs_d < dim
    u = pid_t * BT + tl.arange(0, BT)
    # weight and bias partial sums over this block of output positions
    g = _dpre(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
              sgb, sgd, sgt, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU)  # fmt: skip
    seq_u = 0
    if HAS_SEQ:
        seq_u = tl.load(SEQ + b * T + tl.maximum(tl.minimum(u, T - 1), 0))
    part = (b * ntb + pid_t) * dim + offs_d
    for k in tl.static_range(W):
        v = _tap_value(X, INIT, SEQ, b, offs_d, u - (W - 1) + k, seq_u, T, dim, sxb, sxd, sxt, sib, sid, sit,
                       W, HAS_INIT, HAS_SEQ)  # fmt: skip
        tl.store(DW_PART + part * W + k, tl.sum(g * v, axis=1), mask=md)
    if HAS_BIAS:
        tl.store(DB_PART + part, tl.sum(g, axis=1), mask=md)
    # input gradient on this block
    dx = _dx_at(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, u, T, dim, sxb, sxd, sxt, sib, sid, sit, swd, swk,
                sgb, sgd, sgt, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU)  # fmt: skip
    tl.store(DX + (b * dim + offs_d[:, None]) * T + u[None, :], dx, mask=md[:, None] & (u < T)[None, :])
    if HAS_INIT:  # noqa: SIM102 (pid_t is a runtime value, HAS_INIT a constexpr)
        if pid_t == 0:
            hpos = tl.arange(0, BH) - (W - 1)  # the history positions -(W-1) .. -1
            dh = _dx_at(X, WT, BIAS, INIT, SEQ, DOUT, b, offs_d, hpos, T, dim, sxb, sxd, sxt, sib, sid, sit, swd,
                        swk, sgb, sgd, sgt, W, HAS_BIAS, HAS_INIT, HAS_SEQ, SILU)  # fmt: skip
            # (the history belongs to the first sequence: _dx_at reads seq(t) at t clamped to 0)
            tl.store(
                DINIT + (b * dim + offs_d[:, None]) * (W - 1) + (hpos + W - 1)[None, :],
                dh,
                mask=md[:, None] & (hpos < 0)[None, :],
            )


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu):
        batch, dim, T = x.shape
        width = weight.shape[1]
        out = torch.empty_like(x)
        BD, BT = 32, 64
        seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else x
        init = initial_states if initial_states is not None else x
        bias_ = bias if bias is not None else weight
        grid = (batch, triton.cdiv(dim, BD), triton.cdiv(T, BT))
        _conv_fwd_kernel[grid](
            x, weight, bias_, init, seq, out, T, dim,
            *x.stride(), *init.stride(), *weight.stride(), *out.stride(),
            W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
            SILU=silu, BD=BD, BT=BT,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        batch, dim, T = x.shape
        width = weight.shape[1]
        BD, BT = 32, 64
        ntb = triton.cdiv(T, BT)
        dx = torch.empty(batch, dim, T, device=x.device, dtype=torch.float32)
        dw_part = torch.empty(batch, ntb, dim, width, device=x.device, dtype=torch.float32)
        db_part = torch.empty(batch, ntb, dim, device=x.device, dtype=torch.float32)
        dinit = torch.empty(batch, dim, max(width - 1, 1), device=x.device, dtype=torch.float32)
        seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else x
        init = initial_states if initial_states is not None else x
        bias_ = bias if bias is not None else weight
        _conv_bwd_kernel[(batch, triton.cdiv(dim, BD), ntb)](
            x, weight, bias_, init, seq, dout, dx, dw_part, db_part, dinit, T, dim, ntb,
            *x.stride(), *init.stride(), *weight.stride(), *dout.stride(),
            W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
            SILU=ctx.silu, BD=BD, BT=BT, BH=max(triton.next_power_of_2(width - 1), 2),
        )  # fmt: skip
        dweight = dw_part.sum((0, 1)).to(weight.dtype)
        dbias = db_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
        dinit_out = dinit[:, :, : width - 1].to(initial_states.dtype) if initial_states is not None else None
        return dx.to(x.dtype), dweight, dbias, dinit_out, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         seq_idx: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                         return_final_states: bool = False, final_states_out: torch.Tensor | None = None,
                         activation: str | None = None):
    """``causal_conv1d_fn`` on Triton; see ``posttrain.kernels.causal_conv1d_fn``."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    out = _CausalConv1d.apply(x, weight, bias, initial_states, seq_idx, activation is not None)
    if not (return_final_states or final_states_out is not None):
        return out
    width = weight.shape[1]
    with torch.no_grad():
        history = initial_states if initial_states is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
        final = torch.cat([history.to(x.dtype), x], dim=-1)[:, :, x.shape[2] :]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


@triton.jit
def _conv_update_kernel(
    X, STATE, WT, BIAS, CACHE_LENS, IDX, OUT,
    dim, T, state_len,
    sxb, sxd, sxt, ssb, ssd, sst, swd, swk, sob, sod, sot,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, RING: tl.constexpr, HAS_IDX: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """Outputs of T new tokens from the last inputs kept in the state, then the state moves on by T tokens."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = offs_d < dim
    sb = b
    if HAS_IDX:
        sb = tl.load(IDX + b).to(tl.int64)
    pos = 0
    if RING:
        pos = tl.load(CACHE_LENS + b)
    t = tl.arange(0, BT)
    mt = t < T
    acc = tl.zeros((BD, BT), dtype=tl.float32)
    for k in tl.static_range(W):
        j = t - (W - 1) + k  # position relative to the first new token
        from_x = tl.load(X + b * sxb + offs_d[:, None] * sxd + j[None, :] * sxt,
                         mask=md[:, None] & ((j >= 0) & mt)[None, :], other=0.0)  # fmt: skip
        if RING:
            slot = (pos + j + state_len) % state_len
        else:
            slot = state_len + j
        from_state = tl.load(STATE + sb * ssb + offs_d[:, None] * ssd + slot[None, :] * sst,
                             mask=md[:, None] & ((j < 0) & mt)[None, :], other=0.0)  # fmt: skip
        wk = tl.load(WT + offs_d * swd + k * swk, mask=md, other=0.0).to(tl.float32)
        acc += wk[:, None] * (from_x.to(tl.float32) + from_state.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_d, mask=md, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(OUT + b * sob + offs_d[:, None] * sod + t[None, :] * sot, acc.to(OUT.dtype.element_ty),
             mask=md[:, None] & mt[None, :])  # fmt: skip
    # move the state on
    s = tl.arange(0, BS)
    ms = s < state_len
    if RING:
        # the last min(T, state_len) tokens go to slots (pos + i) % state_len
        i = T - state_len + s
        keep = ms & (i >= 0)
        val = tl.load(X + b * sxb + offs_d[:, None] * sxd + i[None, :] * sxt, mask=md[:, None] & keep[None, :])
        tl.debug_barrier()
        dst = (pos + i + state_len) % state_len
        tl.store(STATE + sb * ssb + offs_d[:, None] * ssd + dst[None, :] * sst, val.to(STATE.dtype.element_ty),
                 mask=md[:, None] & keep[None, :])  # fmt: skip
    else:
        src = s + T  # position in [old state, new tokens]
        from_old = tl.load(STATE + sb * ssb + offs_d[:, None] * ssd + src[None, :] * sst,
                           mask=md[:, None] & (ms & (src < state_len))[None, :], other=0.0)  # fmt: skip
        from_new = tl.load(X + b * sxb + offs_d[:, None] * sxd + (src - state_len)[None, :] * sxt,
                           mask=md[:, None] & (ms & (src >= state_len))[None, :], other=0.0)  # fmt: skip
        tl.debug_barrier()
        new = from_old.to(tl.float32) + from_new.to(tl.float32)
        tl.store(STATE + sb * ssb + offs_d[:, None] * ssd + s[None, :] * sst, new.to(STATE.dtype.element_ty),
                 mask=md[:, None] & ms[None, :])  # fmt: skip


def causal_conv1d_update_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None, activation: str | None = None,
                                cache_seqlens: torch.Tensor | None = None,
                                conv_state_indices: torch.Tensor | None = None) -> torch.Tensor:
    """``causal_conv1d_update`` on Triton (no autograd); see ``posttrain.kernels.causal_conv1d_update``."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, :, None]
    batch, dim, T = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state holds {state_len} steps, the kernel width {width} needs at least {width - 1}")
    out = torch.empty_like(x)
    BD = 32
    lens = cache_seqlens.to(torch.int32).contiguous() if cache_seqlens is not None else out
    idx = conv_state_indices.to(torch.int32).contiguous() if conv_state_indices is not None else out
    bias_ = bias if bias is not None else weight
    _conv_update_kernel[(batch, triton.cdiv(dim, BD))](
        x, conv_state, weight, bias_, lens, idx, out, dim, T, state_len,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        W=width, HAS_BIAS=bias is not None, SILU=activation is not None, RING=cache_seqlens is not None,
        HAS_IDX=conv_state_indices is not None, BD=BD, BT=max(triton.next_power_of_2(T), 2),
        BS=max(triton.next_power_of_2(state_len), 2),
    )  # fmt: skip
    return out[:, :, 0] if squeeze else out
