"""Mamba-2 SSD in Triton: the GPU path of ``mamba_chunk_scan_combined`` and ``selective_state_update``.

The chunked algorithm of the Mamba-2 paper as separate kernels, forward and backward, in a custom autograd
Function (``_SSDChunkScan``). Per chunk of ``Q`` tokens, with ``a_l`` the cumulative ``dt * A`` inside the chunk:

forward
  1. chunk states      ``S_c = sum_s exp(a_last - a_s) dt_s x_s B_s^T``            (``_chunk_state_kernel``, mode 0)
  2. state passing     ``E_{c+1} = exp(a_last) E_c + S_c``  (E_c: state entering chunk c)  (``_state_passing_fwd``)
  3. chunk scan        ``y_l = sum_{s<=l} (C_l.B_s) exp(a_l - a_s) dt_s x_s + exp(a_l) E_c C_l``  (``_chunk_scan_fwd``)
backward (dY the gradient of y)
  1. ``dE_part_c = sum_l exp(a_l) dY_l C_l^T``                                       (``_chunk_state_kernel``, mode 1)
  2. reverse state passing: dS_c, d initial state, d a_last                          (``_state_passing_bwd``)
  3. per target row l: dC_l and the row sums of d a                                   (``_chunk_scan_bwd_dc``)
  4. per source row s: dx_s, d dt_s, dB_s and the column sums of d a                   (``_chunk_scan_bwd_dx``)

Packed sequences (``seq_idx``) only add masks. The step size (softplus, bias, clamp), the in-chunk cumulative sum,
``D`` and the ``z`` gate are cheap elementwise work left to torch (autograd) around the Function. States are
float32. Triton is imported here unconditionally: only the dispatcher in ``__init__`` may import this module,
and only once it knows triton is available. Never call these kernels on tensors that are not on one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from posttrain.kernels.ssd_common import add_head_axis, chunk_scan_outputs, prepare_dt, varlen_states


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def _chunk_state_kernel(
    X, V, DT, ACUM, SEQ, SEQ_REF, OUT,
    T, nheads, hg, p, n, nchunks,
    sxb, sxt, sxh, sxp,
    svb, svt, svg, svn,
    Q: tl.constexpr, MODE: tl.constexpr, HAS_SEQ: tl.constexpr,
    BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """OUT[b, c, h] = sum_l w_l X_l^T V_l over the chunk; mode 0: w = exp(a_last - a_l) dt_l, same sequence as the
    chunk's end; mode 1: w = exp(a_l), same sequence as the state entering the chunk."""
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_n = tl.program_id(2)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // hg
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = pid_n * BN + tl.arange(0, BN)
    base_a = (b * nheads + h) * nchunks * Q + c * Q
    a_last = tl.load(ACUM + base_a + Q - 1)
    if HAS_SEQ:
        ref = tl.load(SEQ_REF + b * nchunks + c)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for l0 in range(0, Q, BL):
        offs_l = l0 + tl.arange(0, BL)
        t = c * Q + offs_l
        valid = t < T
        a = tl.load(ACUM + base_a + offs_l)
        if MODE == 0:
            w = tl.exp(a_last - a) * tl.load(DT + base_a + offs_l)
        else:
            w = tl.exp(a)
        if HAS_SEQ:
            seq = tl.load(SEQ + b * nchunks * Q + c * Q + offs_l)
            w = tl.where(seq == ref, w, 0.0)
        w = tl.where(valid, w, 0.0)
        xv = tl.load(
            X + b * sxb + t[:, None] * sxt + h * sxh + offs_p[None, :] * sxp,
            mask=valid[:, None] & (offs_p[None, :] < p),
            other=0.0,
        )
        vv = tl.load(
            V + b * svb + t[:, None] * svt + g * svg + offs_n[None, :] * svn,
            mask=valid[:, None] & (offs_n[None, :] < n),
            other=0.0,
        )
        xw = (xv.to(tl.float32) * w[:, None]).to(vv.dtype)
        acc += tl.dot(tl.trans(xw), vv)
    out_ptr = OUT + (((b * nchunks + c) * nheads + h) * p + offs_p[:, None]) * n + offs_n[None, :]
    tl.store(out_ptr, acc, mask=(offs_p[:, None] < p) & (offs_n[None, :] < n))


@triton.jit
def _state_passing_fwd(
    STATES, INIT, ALAST, CARRY, ENTER, FINAL,
    nheads, nchunks, dim,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """E_0 = initial state; E_{c+1} = exp(a_last_c) carry_c E_c + S_c. Stores every E_c and the final state."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < dim
    if HAS_INIT:
        s = tl.load(INIT + pid_bh * dim + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nchunks):
        chunk_off = ((b * nchunks + c) * nheads + h) * dim
        tl.store(ENTER + chunk_off + offs, s, mask=m)
        scale = tl.exp(tl.load(ALAST + pid_bh * nchunks + c)) * tl.load(CARRY + b * nchunks + c)
        s = s * scale + tl.load(STATES + chunk_off + offs, mask=m, other=0.0)
    tl.store(FINAL + pid_bh * dim + offs, s, mask=m)


@triton.jit
def _state_passing_bwd(
    DSPART, ENTER, ALAST, CARRY, DFINAL, DSTATES, DINIT, DALAST,
    nheads, nchunks, dim, nblocks,
    HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Reverse of ``_state_passing_fwd``: dS_c = dE_{c+1}; dE_c = dE_part_c + exp(a_last_c) carry_c dE_{c+1}."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < dim
    if HAS_DFINAL:
        ds = tl.load(DFINAL + pid_bh * dim + offs, mask=m, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        chunk_off = ((b * nchunks + c) * nheads + h) * dim
        tl.store(DSTATES + chunk_off + offs, ds, mask=m)
        scale = tl.exp(tl.load(ALAST + pid_bh * nchunks + c)) * tl.load(CARRY + b * nchunks + c)
        ent = tl.load(ENTER + chunk_off + offs, mask=m, other=0.0)
        tl.store(DALAST + (pid_bh * nchunks + c) * nblocks + pid, tl.sum(ds * ent, axis=0) * scale)
        ds = ds * scale + tl.load(DSPART + chunk_off + offs, mask=m, other=0.0)
    tl.store(DINIT + pid_bh * dim + offs, ds, mask=m)


@triton.jit
def _chunk_scan_fwd(
    X, DT, ACUM, B, C, SEQ, SEQ_ENTER, ENTER, Y,
    T, nheads, hg, p, n, nchunks,
    sxb, sxt, sxh, sxp,
    sbb, sbt, sbg, sbn,
    scb, sct, scg, scn,
    syb, syt, syh, syp,
    Q: tl.constexpr, HAS_SEQ: tl.constexpr,
    BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """y_l = exp(a_l) E_c C_l + sum_{s<=l, same sequence} (C_l . B_s) exp(a_l - a_s) dt_s x_s."""
    pid = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_p = tl.program_id(2)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // hg
    offs_l = pid_l * BL + tl.arange(0, BL)
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    t_l = c * Q + offs_l
    valid_l = t_l < T
    base_a = (b * nheads + h) * nchunks * Q + c * Q
    a_l = tl.load(ACUM + base_a + offs_l)
    c_l = tl.load(
        C + b * scb + t_l[:, None] * sct + g * scg + offs_n[None, :] * scn,
        mask=valid_l[:, None] & (offs_n[None, :] < n),
        other=0.0,
    )
    ent = tl.load(
        ENTER + (((b * nchunks + c) * nheads + h) * p + offs_p[:, None]) * n + offs_n[None, :],
        mask=(offs_p[:, None] < p) & (offs_n[None, :] < n),
        other=0.0,
    )
    scale_l = tl.exp(a_l)
    if HAS_SEQ:
        seq_l = tl.load(SEQ + b * nchunks * Q + c * Q + offs_l)
        scale_l = tl.where(seq_l == tl.load(SEQ_ENTER + b * nchunks + c), scale_l, 0.0)
    acc = tl.dot(c_l, tl.trans(ent.to(c_l.dtype))) * scale_l[:, None]
    for s0 in range(0, (pid_l + 1) * BL, BL):
        offs_s = s0 + tl.arange(0, BL)
        t_s = c * Q + offs_s
        valid_s = t_s < T
        b_s = tl.load(
            B + b * sbb + t_s[:, None] * sbt + g * sbg + offs_n[None, :] * sbn,
            mask=valid_s[:, None] & (offs_n[None, :] < n),
            other=0.0,
        )
        x_s = tl.load(
            X + b * sxb + t_s[:, None] * sxt + h * sxh + offs_p[None, :] * sxp,
            mask=valid_s[:, None] & (offs_p[None, :] < p),
            other=0.0,
        )
        a_s = tl.load(ACUM + base_a + offs_s)
        dt_s = tl.load(DT + base_a + offs_s)
        mask = (offs_s[None, :] <= offs_l[:, None]) & valid_s[None, :]
        if HAS_SEQ:
            seq_s = tl.load(SEQ + b * nchunks * Q + c * Q + offs_s)
            mask = mask & (seq_l[:, None] == seq_s[None, :])
        decay = tl.where(mask, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)
        cb = tl.dot(c_l, tl.trans(b_s))
        acc += tl.dot((cb * decay * dt_s[None, :]).to(x_s.dtype), x_s)
    tl.store(
        Y + b * syb + t_l[:, None] * syt + h * syh + offs_p[None, :] * syp,
        acc.to(Y.dtype.element_ty),
        mask=valid_l[:, None] & (offs_p[None, :] < p),
    )


@triton.jit
def _chunk_scan_bwd_dc(
    X, DT, ACUM, B, C, SEQ, SEQ_ENTER, ENTER, DY, DC, DA_ROWS,
    T, nheads, hg, p, n, nchunks,
    sxb, sxt, sxh, sxp,
    sbb, sbt, sbg, sbn,
    scb, sct, scg, scn,
    sdb, sdt, sdh, sdp,
    Q: tl.constexpr, HAS_SEQ: tl.constexpr,
    BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Per target row l: dC_l (one head's share) and sum_s dM_ls M_ls plus dY_l . y_off_l (d a_l, row part)."""
    pid = tl.program_id(0)
    pid_l = tl.program_id(1)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // hg
    offs_l = pid_l * BL + tl.arange(0, BL)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    t_l = c * Q + offs_l
    valid_l = t_l < T
    base_a = (b * nheads + h) * nchunks * Q + c * Q
    a_l = tl.load(ACUM + base_a + offs_l)
    c_l = tl.load(
        C + b * scb + t_l[:, None] * sct + g * scg + offs_n[None, :] * scn,
        mask=valid_l[:, None] & (offs_n[None, :] < n),
        other=0.0,
    )
    dy_l = tl.load(
        DY + b * sdb + t_l[:, None] * sdt + h * sdh + offs_p[None, :] * sdp,
        mask=valid_l[:, None] & (offs_p[None, :] < p),
        other=0.0,
    )
    ent = tl.load(
        ENTER + (((b * nchunks + c) * nheads + h) * p + offs_p[:, None]) * n + offs_n[None, :],
        mask=(offs_p[:, None] < p) & (offs_n[None, :] < n),
        other=0.0,
    )
    scale_l = tl.exp(a_l)
    if HAS_SEQ:
        seq_l = tl.load(SEQ + b * nchunks * Q + c * Q + offs_l)
        scale_l = tl.where(seq_l == tl.load(SEQ_ENTER + b * nchunks + c), scale_l, 0.0)
    dc = tl.dot(dy_l, ent.to(dy_l.dtype)) * scale_l[:, None]
    da = tl.sum(dc * c_l.to(tl.float32), axis=1)
    for s0 in range(0, (pid_l + 1) * BL, BL):
        offs_s = s0 + tl.arange(0, BL)
        t_s = c * Q + offs_s
        valid_s = t_s < T
        b_s = tl.load(
            B + b * sbb + t_s[:, None] * sbt + g * sbg + offs_n[None, :] * sbn,
            mask=valid_s[:, None] & (offs_n[None, :] < n),
            other=0.0,
        )
        x_s = tl.load(
            X + b * sxb + t_s[:, None] * sxt + h * sxh + offs_p[None, :] * sxp,
            mask=valid_s[:, None] & (offs_p[None, :] < p),
            other=0.0,
        )
        a_s = tl.load(ACUM + base_a + offs_s)
        dt_s = tl.load(DT + base_a + offs_s)
        mask = (offs_s[None, :] <= offs_l[:, None]) & valid_s[None, :]
        if HAS_SEQ:
            seq_s = tl.load(SEQ + b * nchunks * Q + c * Q + offs_s)
            mask = mask & (seq_l[:, None] == seq_s[None, :])
        decay = tl.where(mask, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)
        dm = tl.dot(dy_l, tl.trans(x_s.to(dy_l.dtype))) * dt_s[None, :]
        dcb = dm * decay
        dc += tl.dot(dcb.to(b_s.dtype), b_s)
        cb = tl.dot(c_l, tl.trans(b_s))
        da += tl.sum(dcb * cb, axis=1)
    tl.store(
        DC + ((b * T + t_l[:, None]) * nheads + h) * n + offs_n[None, :],
        dc,
        mask=valid_l[:, None] & (offs_n[None, :] < n),
    )
    tl.store(DA_ROWS + base_a + offs_l, da)


@triton.jit
def _chunk_scan_bwd_dx(
    X, DT, ACUM, B, C, SEQ, SEQ_LAST, DSTATES, DY, DX, DDT, DB, DA_COLS, DALAST,
    T, nheads, hg, p, n, nchunks, nsblocks,
    sxb, sxt, sxh, sxp,
    sbb, sbt, sbg, sbn,
    scb, sct, scg, scn,
    sdb, sdt, sdh, sdp,
    Q: tl.constexpr, HAS_SEQ: tl.constexpr,
    BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Per source row s: d(x dt)_s -> dx_s and d dt_s, dB_s (one head's share), the column part of d a, and the
    chunk state's share of d a_last."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // hg
    offs_s = pid_s * BL + tl.arange(0, BL)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    t_s = c * Q + offs_s
    valid_s = t_s < T
    base_a = (b * nheads + h) * nchunks * Q + c * Q
    a_s = tl.load(ACUM + base_a + offs_s)
    dt_s = tl.load(DT + base_a + offs_s)
    a_last = tl.load(ACUM + base_a + Q - 1)
    b_s = tl.load(
        B + b * sbb + t_s[:, None] * sbt + g * sbg + offs_n[None, :] * sbn,
        mask=valid_s[:, None] & (offs_n[None, :] < n),
        other=0.0,
    )
    x_s = tl.load(
        X + b * sxb + t_s[:, None] * sxt + h * sxh + offs_p[None, :] * sxp,
        mask=valid_s[:, None] & (offs_p[None, :] < p),
        other=0.0,
    ).to(tl.float32)
    g_state = tl.load(
        DSTATES + (((b * nchunks + c) * nheads + h) * p + offs_p[:, None]) * n + offs_n[None, :],
        mask=(offs_p[:, None] < p) & (offs_n[None, :] < n),
        other=0.0,
    )
    w_s = tl.exp(a_last - a_s)
    if HAS_SEQ:
        seq_s = tl.load(SEQ + b * nchunks * Q + c * Q + offs_s)
        w_s = tl.where(seq_s == tl.load(SEQ_LAST + b * nchunks + c), w_s, 0.0)
    w_s = tl.where(valid_s, w_s, 0.0)
    xdt = x_s * dt_s[:, None]
    # the chunk state's share: S_c = sum_s w_s xdt_s B_s^T
    gb = tl.dot(b_s, tl.trans(g_state.to(b_s.dtype)))  # (BL, BP)
    dxdt = gb * w_s[:, None]
    db = tl.dot(xdt.to(b_s.dtype), g_state.to(b_s.dtype)) * w_s[:, None]
    t_state = tl.sum(xdt * gb, axis=1) * w_s
    da = -t_state
    # the intra-chunk share: y_l += M_ls xdt_s for every l >= s of the chunk
    for l0 in range(pid_s * BL, Q, BL):
        offs_l = l0 + tl.arange(0, BL)
        t_l = c * Q + offs_l
        valid_l = t_l < T
        c_l = tl.load(
            C + b * scb + t_l[:, None] * sct + g * scg + offs_n[None, :] * scn,
            mask=valid_l[:, None] & (offs_n[None, :] < n),
            other=0.0,
        )
        dy_l = tl.load(
            DY + b * sdb + t_l[:, None] * sdt + h * sdh + offs_p[None, :] * sdp,
            mask=valid_l[:, None] & (offs_p[None, :] < p),
            other=0.0,
        )
        a_l = tl.load(ACUM + base_a + offs_l)
        mask = (offs_s[None, :] <= offs_l[:, None]) & valid_s[None, :] & valid_l[:, None]
        if HAS_SEQ:
            seq_l = tl.load(SEQ + b * nchunks * Q + c * Q + offs_l)
            mask = mask & (seq_l[:, None] == seq_s[None, :])
        decay = tl.where(mask, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)  # (BL_l, BL_s)
        cb = tl.dot(c_l, tl.trans(b_s))
        m = cb * decay
        dxdt += tl.dot(tl.trans(m).to(dy_l.dtype), dy_l)
        dm = tl.dot(dy_l, tl.trans(xdt.to(dy_l.dtype)))
        dcb = dm * decay
        db += tl.dot(tl.trans(dcb).to(c_l.dtype), c_l)
        da -= tl.sum(dcb * cb, axis=0)
    out_mask = valid_s[:, None] & (offs_p[None, :] < p)
    tl.store(DX + ((b * T + t_s[:, None]) * nheads + h) * p + offs_p[None, :], dxdt * dt_s[:, None], mask=out_mask)
    tl.store(DDT + base_a + offs_s, tl.sum(dxdt * x_s, axis=1))
    tl.store(
        DB + ((b * T + t_s[:, None]) * nheads + h) * n + offs_n[None, :],
        db,
        mask=valid_s[:, None] & (offs_n[None, :] < n),
    )
    tl.store(DA_COLS + base_a + offs_s, da)
    tl.store(DALAST + ((b * nheads + h) * nchunks + c) * nsblocks + pid_s, tl.sum(t_state, axis=0))


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class _Plan:
    """Shapes, block sizes and the per-chunk sequence bookkeeping shared by forward and backward."""

    def __init__(self, x: torch.Tensor, B: torch.Tensor, chunk_size: int, seq_idx: torch.Tensor | None):
        self.batch, self.T, self.nheads, self.p = x.shape
        self.ngroups, self.n = B.shape[2], B.shape[3]
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        Q = int(chunk_size)
        if Q < 16 or Q & (Q - 1):
            raise ValueError(f"the Triton SSD needs chunk_size a power of two >= 16, got {chunk_size}")
        self.Q = Q
        self.hg = self.nheads // self.ngroups
        self.nchunks = triton.cdiv(self.T, Q)
        self.BL = min(Q, 64)
        self.BP = _pow2(self.p)
        self.BN = _pow2(self.n)
        self.has_seq = seq_idx is not None
        dev = x.device
        if seq_idx is not None:
            padded = F.pad(seq_idx.to(torch.int32), (0, self.nchunks * Q - self.T), value=0)
            padded[:, self.T :] = seq_idx[:, -1:].to(torch.int32)
            self.seq = padded.contiguous()
            per_chunk = padded.view(self.batch, self.nchunks, Q)
            self.seq_last = per_chunk[:, :, -1].contiguous()
            self.seq_enter = torch.cat([padded[:, :1], per_chunk[:, :-1, -1]], dim=1).contiguous()
            self.carry = (self.seq_enter == self.seq_last).float().contiguous()
        else:
            self.seq = self.seq_last = self.seq_enter = torch.zeros(1, dtype=torch.int32, device=dev)
            self.carry = torch.ones(self.batch, self.nchunks, dtype=torch.float32, device=dev)


def _chunk_state(plan: _Plan, X, V, dt_c, a_cum, mode: int) -> torch.Tensor:
    out = torch.empty(plan.batch, plan.nchunks, plan.nheads, plan.p, plan.n, device=X.device, dtype=torch.float32)
    BP, BN = min(plan.BP, 64), min(plan.BN, 64)
    grid = (plan.batch * plan.nchunks * plan.nheads, triton.cdiv(plan.p, BP), triton.cdiv(plan.n, BN))
    ref = plan.seq_last if mode == 0 else plan.seq_enter
    _chunk_state_kernel[grid](
        X, V, dt_c, a_cum, plan.seq, ref, out,
        plan.T, plan.nheads, plan.hg, plan.p, plan.n, plan.nchunks,
        *_strides4(X), *_strides4(V),
        Q=plan.Q, MODE=mode, HAS_SEQ=plan.has_seq, BL=plan.BL, BP=BP, BN=BN,
    )  # fmt: skip
    return out


class _SSDChunkScan(torch.autograd.Function):
    """y (no D, no gate), final state, entering states from x, processed dt (b, h, c*Q), A, B, C, initial states."""

    @staticmethod
    def forward(ctx, x, dt_c, a_cum, B, C, initial_states, plan: _Plan):
        dim = plan.p * plan.n
        states = _chunk_state(plan, x, B, dt_c, a_cum, mode=0)
        enter = torch.empty_like(states)
        final = torch.empty(plan.batch, plan.nheads, plan.p, plan.n, device=x.device, dtype=torch.float32)
        a_last = a_cum.view(plan.batch, plan.nheads, plan.nchunks, plan.Q)[..., -1].contiguous()
        block = min(1024, triton.next_power_of_2(dim))
        init = initial_states.float().contiguous() if initial_states is not None else final
        _state_passing_fwd[(plan.batch * plan.nheads, triton.cdiv(dim, block))](
            states, init, a_last, plan.carry, enter, final, plan.nheads, plan.nchunks, dim,
            HAS_INIT=initial_states is not None, BLOCK=block,
        )  # fmt: skip
        y = torch.empty_like(x)
        grid = (plan.batch * plan.nchunks * plan.nheads, plan.Q // plan.BL, triton.cdiv(plan.p, min(plan.BP, 64)))
        _chunk_scan_fwd[grid](
            x, dt_c, a_cum, B, C, plan.seq, plan.seq_enter, enter, y,
            plan.T, plan.nheads, plan.hg, plan.p, plan.n, plan.nchunks,
            *_strides4(x), *_strides4(B), *_strides4(C), *_strides4(y),
            Q=plan.Q, HAS_SEQ=plan.has_seq, BL=plan.BL, BP=min(plan.BP, 64), BN=plan.BN,
        )  # fmt: skip
        ctx.save_for_backward(x, dt_c, a_cum, B, C, enter, a_last)
        ctx.plan = plan
        ctx.has_init = initial_states is not None
        ctx.mark_non_differentiable(enter)
        return y, final, enter

    @staticmethod
    def backward(ctx, dy, dfinal, _denter):
        x, dt_c, a_cum, B, C, enter, a_last = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, T, h, p, n, nc, Q = plan.batch, plan.T, plan.nheads, plan.p, plan.n, plan.nchunks, plan.Q
        dim = p * n
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype)
        # 1. what the outputs of each chunk ask of the state entering it
        dspart = _chunk_state(plan, dy, C, dt_c, a_cum, mode=1)
        # 2. reverse state passing
        block = min(1024, triton.next_power_of_2(dim))
        nblocks = triton.cdiv(dim, block)
        dstates = torch.empty_like(dspart)
        dinit = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
        dalast_pass = torch.empty(b, h, nc, nblocks, device=x.device, dtype=torch.float32)
        dfin = dfinal.float().contiguous() if dfinal is not None else dinit
        _state_passing_bwd[(b * h, nblocks)](
            dspart, enter, a_last, plan.carry, dfin, dstates, dinit, dalast_pass, h, nc, dim, nblocks,
            HAS_DFINAL=dfinal is not None, BLOCK=block,
        )  # fmt: skip
        # 3 and 4. the chunk scan's gradients
        dc_heads = torch.empty(b, T, h, n, device=x.device, dtype=torch.float32)
        db_heads = torch.empty(b, T, h, n, device=x.device, dtype=torch.float32)
        dx = torch.empty(b, T, h, p, device=x.device, dtype=torch.float32)
        da_rows = torch.empty_like(a_cum)
        da_cols = torch.empty_like(a_cum)
        ddt = torch.empty_like(a_cum)
        nsblocks = Q // plan.BL
        dalast_state = torch.empty(b, h, nc, nsblocks, device=x.device, dtype=torch.float32)
        grid = (b * nc * h, nsblocks)
        common = (plan.T, h, plan.hg, p, n, nc)
        strides = (*_strides4(x), *_strides4(B), *_strides4(C), *_strides4(dy))
        _chunk_scan_bwd_dc[grid](
            x, dt_c, a_cum, B, C, plan.seq, plan.seq_enter, enter, dy, dc_heads, da_rows, *common, *strides,
            Q=Q, HAS_SEQ=plan.has_seq, BL=plan.BL, BP=plan.BP, BN=plan.BN,
        )  # fmt: skip
        _chunk_scan_bwd_dx[grid](
            x, dt_c, a_cum, B, C, plan.seq, plan.seq_last, dstates, dy, dx, ddt, db_heads, da_cols, dalast_state,
            *common, nsblocks, *strides,
            Q=Q, HAS_SEQ=plan.has_seq, BL=plan.BL, BP=plan.BP, BN=plan.BN,
        )  # fmt: skip
        da = (da_rows + da_cols).view(b, h, nc, Q)
        da[..., -1] += dalast_pass.sum(-1) + dalast_state.sum(-1)
        dB = db_heads.view(b, T, plan.ngroups, plan.hg, n).sum(3).to(B.dtype)
        dC = dc_heads.view(b, T, plan.ngroups, plan.hg, n).sum(3).to(C.dtype)
        dinit_out = dinit if ctx.has_init else None
        return dx.to(x.dtype), ddt.view_as(a_cum), da.view_as(a_cum), dB, dC, dinit_out, None


def ssd_chunked_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       chunk_size: int, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                       seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                       dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                       return_final_states: bool = False, return_varlen_states: bool = False):
    """``mamba_chunk_scan_combined`` on the Triton kernels; see ``posttrain.kernels.mamba_chunk_scan_combined``."""
    plan = _Plan(x, B, chunk_size, seq_idx)
    b, T, h, Q, nc = plan.batch, plan.T, plan.nheads, plan.Q, plan.nchunks
    # step sizes and the in-chunk cumulative decay: cheap elementwise work, differentiated by autograd
    dt_p = prepare_dt(dt.float(), None if dt_bias is None else dt_bias.float(), dt_softplus, dt_limit)
    dt_c = F.pad(dt_p.transpose(1, 2), (0, nc * Q - T)).contiguous()  # (b, h, c*Q), zero past the end
    a_cum = torch.cumsum((dt_c * A.float()[None, :, None]).view(b, h, nc, Q), dim=-1).view(b, h, nc * Q)
    y, final, enter = _SSDChunkScan.apply(x, dt_c, a_cum, B, C, initial_states, plan)
    if D is not None or z is not None:
        out = y.float()
        if D is not None:
            out = out + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
        if z is not None:
            out = out * F.silu(z.float())
        y = out.to(x.dtype)

    @torch.no_grad()
    def varlen() -> torch.Tensor:
        x_dt = F.pad(x.float() * dt_p[..., None], (0, 0, 0, 0, 0, nc * Q - T))
        Bp = F.pad(B.float(), (0, 0, 0, 0, 0, nc * Q - T))
        return varlen_states(
            cu_seqlens,
            enter[0].transpose(0, 1),
            a_cum[0].view(h, nc, Q),
            x_dt[0].view(nc, Q, h, plan.p),
            Bp[0].view(nc, Q, plan.ngroups, plan.n),
            seq_idx,
            plan.hg,
            Q,
        )

    return chunk_scan_outputs(y, lambda: final, varlen, return_final_states, return_varlen_states, cu_seqlens, b)


@triton.jit
def _state_update_kernel(
    STATE, X, DT, A, B, C, D, Z, DT_BIAS, SIDX, OUT,
    nheads, hg, p, n,
    ssb, ssh, ssp, ssn,
    sxb, sxh, sxp,
    sdtb, sdth, sdtp,
    sah, sap, san,
    sbb, sbg, sbn,
    scb, scg, scn,
    sdh, sdp,
    szb, szh, szp,
    sbh, sbp,
    sob, soh, sop,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SIDX: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """One decode step for one (batch, head, block of headdim): h = exp(dt A) h + dt x B^T; y = h C + D x."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    pid_p = tl.program_id(2)
    g = h // hg
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < p
    mn = offs_n < n
    sb = pid_b
    if HAS_SIDX:
        sb = tl.load(SIDX + pid_b).to(tl.int64)
    state_ptr = STATE + sb * ssb + h * ssh + offs_p[:, None] * ssp + offs_n[None, :] * ssn
    state = tl.load(state_ptr, mask=mp[:, None] & mn[None, :], other=0.0).to(tl.float32)
    x = tl.load(X + pid_b * sxb + h * sxh + offs_p * sxp, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(DT + pid_b * sdtb + h * sdth + offs_p * sdtp, mask=mp, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(DT_BIAS + h * sbh + offs_p * sbp, mask=mp, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    a = tl.load(A + h * sah + offs_p[:, None] * sap + offs_n[None, :] * san, mask=mp[:, None] & mn[None, :], other=0.0)
    bv = tl.load(B + pid_b * sbb + g * sbg + offs_n * sbn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C + pid_b * scb + g * scg + offs_n * scn, mask=mn, other=0.0).to(tl.float32)
    state = state * tl.exp(dt[:, None] * a.to(tl.float32)) + (dt * x)[:, None] * bv[None, :]
    tl.store(state_ptr, state.to(STATE.dtype.element_ty), mask=mp[:, None] & mn[None, :])
    out = tl.sum(state * cv[None, :], axis=1)
    if HAS_D:
        out += x * tl.load(D + h * sdh + offs_p * sdp, mask=mp, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(Z + pid_b * szb + h * szh + offs_p * szp, mask=mp, other=0.0).to(tl.float32)
        out = out * zv * tl.sigmoid(zv)
    tl.store(OUT + pid_b * sob + h * soh + offs_p * sop, out.to(OUT.dtype.element_ty), mask=mp)


def selective_state_update_triton(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                                  z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                                  dt_softplus: bool = False,
                                  state_batch_indices: torch.Tensor | None = None) -> torch.Tensor:
    """One Mamba-2 decode step on Triton (no autograd); see ``posttrain.kernels.selective_state_update``."""
    single_head = x.dim() == 2
    if single_head:  # mamba_ssm also accepts (batch, dim) without a head axis
        state, x, dt, A, B, C, D, z, dt_bias = add_head_axis(state, x, dt, A, B, C, D, z, dt_bias)
    batch, nheads, p = x.shape
    ngroups, n = B.shape[1], B.shape[2]
    out = torch.empty_like(x)
    BP = min(_pow2(p, 1), 64)
    BN = _pow2(n, 1)
    dummy = out
    z_ = z if z is not None else dummy
    D_ = D if D is not None else dummy[0]
    bias_ = dt_bias if dt_bias is not None else dummy[0]
    sidx = state_batch_indices if state_batch_indices is not None else dummy
    _state_update_kernel[(batch, nheads, triton.cdiv(p, BP))](
        state, x, dt, A, B, C, D_, z_, bias_, sidx, out,
        nheads, nheads // ngroups, p, n,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *D_.stride(), *z_.stride(), *bias_.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_SIDX=state_batch_indices is not None, BP=BP, BN=BN,
    )  # fmt: skip
    return out[:, 0] if single_head else out
