"""Mamba-2 SSD in chunked pure torch: the CPU path of ``mamba_chunk_scan_combined`` and the decode step.

The chunked form of the Mamba-2 paper (state space duality), in its four steps:

1. intra-chunk outputs: inside a chunk the SSM is a masked, decaying "attention" ``(C B^T o L) (x dt)``;
2. chunk states: the state each chunk leaves behind from its own tokens;
3. inter-chunk recurrence: pass states from chunk to chunk (a tiny scan over chunks);
4. state-to-output: each token reads the state that entered its chunk through ``C``.

Packed sequences (``seq_idx``) only change masks: no token sees a token of another sequence, a state crosses a
chunk border only inside one sequence, and ``initial_states`` reach the first sequence only. Everything is computed
in float32 (float64 for float64 inputs), differentiable by torch autograd; states are float32 whatever the input
dtype. This module must stay pure torch: it is the path every CPU run takes and must never import triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from posttrain.kernels.ssd_common import add_head_axis, chunk_scan_outputs, prepare_dt, varlen_states


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_time(t: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 (time) at the end by ``pad`` entries."""
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[1] = pad
    return torch.cat([t, t.new_full(shape, value)], dim=1)


def ssd_chunked_torch(
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
    """``posttrain.kernels.mamba_chunk_scan_combined`` in chunked torch: Mamba-2 SSD (chunked state space duality)
    over whole sequences, as mamba_ssm's ``mamba_chunk_scan_combined``.

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
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    heads_per_group = nheads // ngroups
    cdtype = _compute_dtype(x.dtype)
    out_dtype = x.dtype
    # A sequence shorter than a chunk is one chunk of its own length: the same sums without the padding (the
    # intra-chunk terms grow with the square of the chunk, so a 24-token prompt in 64-token chunks paid 7x).
    Q = min(chunk_size, max(seqlen, 1))
    pad = (-seqlen) % Q
    nchunks = (seqlen + pad) // Q

    dt = prepare_dt(dt.to(cdtype), dt_bias, dt_softplus, dt_limit)  # (b, T, h)
    # Padded steps get dt = 0: they neither decay nor feed the state.
    dt = _pad_time(dt, pad)
    xc = _pad_time(x.to(cdtype), pad)
    Bc = _pad_time(B.to(cdtype), pad)
    Cc = _pad_time(C.to(cdtype), pad)
    Ac = A.to(cdtype)

    x_dt = xc * dt[..., None]  # (b, T, h, p): the input the state sees
    dA = (dt * Ac).view(batch, nchunks, Q, nheads).permute(0, 3, 1, 2)  # (b, h, c, l)
    dA_cum = torch.cumsum(dA, dim=-1)  # decay from chunk start to position l, inclusive

    x_dt = x_dt.view(batch, nchunks, Q, nheads, headdim)
    Bc = Bc.view(batch, nchunks, Q, ngroups, dstate)
    Cc = Cc.view(batch, nchunks, Q, ngroups, dstate)

    # Sequence membership masks (packed rows). seq_pos: (b, c, l).
    if seq_idx is not None:
        seq = _pad_time(seq_idx, pad)
        if pad:
            seq[:, seqlen:] = seq_idx[:, -1:]
        seq_pos = seq.view(batch, nchunks, Q)
        seq_last = seq_pos[:, :, -1]  # sequence the state at each chunk end belongs to
        seq_first = seq_idx[:, :1]  # initial_states belong to the first sequence
        seq_enter = torch.cat([seq_first, seq_last[:, :-1]], dim=1)  # sequence of the state entering each chunk
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()

    # 1. Intra-chunk outputs: y_l = sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) x_s dt_s
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, l, s), once per group
    seg = dA_cum[..., :, None] - dA_cum[..., None, :]  # (b, h, c, l, s)
    mask = causal
    if seq_idx is not None:
        mask = causal & (seq_pos[:, :, :, None] == seq_pos[:, :, None, :])  # (b, c, l, s)
        mask = mask[:, None]
    decay = torch.exp(seg.masked_fill(~mask, float("-inf")))  # (b, h, c, l, s)
    decay = decay.view(batch, ngroups, heads_per_group, nchunks, Q, Q)
    scores = CB.permute(0, 2, 1, 3, 4)[:, :, None] * decay  # (b, g, hg, c, l, s)
    x_g = x_dt.view(batch, nchunks, Q, ngroups, heads_per_group, headdim).permute(0, 3, 4, 1, 2, 5)
    y = torch.matmul(scores, x_g)  # (b, g, hg, c, l, p)

    # 2. Chunk states: state_c = sum_s exp(cum_last - cum_s) x_s dt_s B_s^T (same sequence as the chunk's end).
    to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # (b, h, c, l)
    if seq_idx is not None:
        to_end = to_end * (seq_pos == seq_last[..., None])[:, None].to(cdtype)
    to_end = to_end.view(batch, ngroups, heads_per_group, nchunks, Q)
    B_g = Bc.permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, s, n)
    chunk_states = torch.matmul((x_g * to_end[..., None]).transpose(-1, -2), B_g)  # (b, g, hg, c, p, n)
    chunk_states = chunk_states.reshape(batch, nheads, nchunks, headdim, dstate)

    if nchunks == 1 and initial_states is None:
        # One chunk and no initial state: nothing enters the chunk, so steps 3 and 4 add exact zeros (a prefill of
        # short prompts, the common case); the state it leaves is its own.
        entering = torch.zeros_like(chunk_states)
        final_state = chunk_states[:, :, 0]
    else:
        # 3. Inter-chunk recurrence: the state entering chunk c, a scan over chunks written as one masked matrix.
        if initial_states is None:
            init = chunk_states.new_zeros(batch, nheads, 1, headdim, dstate)
        else:
            init = initial_states.to(cdtype)[:, :, None]
        all_states = torch.cat([init, chunk_states], dim=2)  # (b, h, c+1, p, n): index 0 = before the first chunk
        chunk_decay = F.pad(dA_cum[..., -1], (1, 0))  # (b, h, c+1)
        chunk_cum = torch.cumsum(chunk_decay, dim=-1)
        # carry[i, j]: how much of the state left at chunk border j survives at border i (i >= j).
        carry_log = chunk_cum[..., :, None] - chunk_cum[..., None, :]
        carry_mask = torch.ones(nchunks + 1, nchunks + 1, dtype=torch.bool, device=x.device).tril()
        if seq_idx is not None:
            seq_border = torch.cat([seq_first, seq_last], dim=1)  # (b, c+1)
            carry_mask = carry_mask & (seq_border[:, :, None] == seq_border[:, None, :])
            carry_mask = carry_mask[:, None]
        carry = torch.exp(carry_log.masked_fill(~carry_mask, float("-inf")))  # (b, h, c+1, c+1)
        border_states = torch.einsum("bhij,bhjpn->bhipn", carry, all_states)  # state at each border
        entering = border_states[:, :, :-1]  # (b, h, c, p, n)
        final_state = border_states[:, :, -1]

        # 4. State-to-output: y_l += exp(cum_l) C_l . state_entering (if l is in the state's sequence).
        from_start = torch.exp(dA_cum)  # (b, h, c, l)
        if seq_idx is not None:
            from_start = from_start * (seq_pos == seq_enter[..., None])[:, None].to(cdtype)
        entering_g = entering.view(batch, ngroups, heads_per_group, nchunks, headdim, dstate)
        C_g = Cc.permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, l, n)
        y_off = torch.matmul(C_g, entering_g.transpose(-1, -2))  # (b, g, hg, c, l, p)
        from_start = from_start.view(batch, ngroups, heads_per_group, nchunks, Q, 1)
        y = y + y_off * from_start

    out = y.permute(0, 3, 4, 1, 2, 5).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]
    if D is not None:
        Dc = D.to(cdtype)
        out = torch.addcmul(out, x.to(cdtype), Dc[:, None] if Dc.dim() == 1 else Dc)  # out + x * D in one pass
    if z is not None:
        out = out * F.silu(z.to(cdtype))
    out = out.to(out_dtype)

    def as_state(state: torch.Tensor) -> torch.Tensor:  # states are float32 unless the inputs are float64
        return state.float() if cdtype != torch.float64 else state

    def varlen() -> torch.Tensor:
        return as_state(varlen_states(cu_seqlens, entering[0], dA_cum[0], x_dt[0], Bc[0], seq_idx, heads_per_group, Q))

    return chunk_scan_outputs(out, lambda: as_state(final_state), varlen, return_final_states, return_varlen_states,
                              cu_seqlens, batch)


def selective_state_update_torch(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                 B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                                 z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                                 dt_softplus: bool = False,
                                 state_batch_indices: torch.Tensor | None = None) -> torch.Tensor:
    """``posttrain.kernels.selective_state_update`` in torch: one Mamba-2 decode step, as mamba_ssm's
    ``selective_state_update`` (multi-head shapes).

    state (batch, nheads, headdim, dstate) float32, updated in place (rows ``state_batch_indices`` when given),
    x (batch, nheads, headdim), dt (batch, nheads, headdim), A (nheads, headdim, dstate), B and C (batch,
    ngroups, dstate), D (nheads, headdim), z like x, dt_bias (nheads, headdim). Returns out (batch, nheads,
    headdim) in x's dtype. The head axis may be left out everywhere, as in mamba_ssm.
    """
    single_head = x.dim() == 2
    if single_head:  # mamba_ssm also accepts (batch, dim) without a head axis
        state, x, dt, A, B, C, D, z, dt_bias = add_head_axis(state, x, dt, A, B, C, D, z, dt_bias)
    per_head = dt.stride(-1) == 0 and A.stride(-1) == 0 and A.stride(-2) == 0 and (
        dt_bias is None or dt_bias.stride(-1) == 0)
    if (per_head and state_batch_indices is None and state.dtype == torch.float32 and x.dtype == torch.float32
            and state.is_contiguous() and (D is None or D.stride(-1) == 0)):
        out = mamba2_step_float32(state, x, dt[..., 0], A[:, 0, 0], B, C,
                                   None if D is None else D[:, 0], None if dt_bias is None else dt_bias[:, 0],
                                   dt_softplus)
        if z is not None:
            out = out * F.silu(z)
        return out[:, 0] if single_head else out
    if per_head:
        # Mamba-2 passes per-head dt and A expanded over (p, n): compute per head and broadcast
        dt, A = dt[..., :1], A[:, :1, :1]
        dt_bias = None if dt_bias is None else dt_bias[..., :1]
    nheads = x.shape[1]
    ngroups = B.shape[1]
    hg = nheads // ngroups
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.float().repeat_interleave(hg, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(hg, dim=1)
    xf = x.float()
    decay = torch.exp(dt[..., None] * A.float())  # (b, h, p, n), or (b, h, 1, 1) per head
    inject = (dt * xf)[..., None] * Bh[:, :, None, :]
    if state_batch_indices is not None:
        idx = state_batch_indices.long()
        old = state[idx].float()
        new = decay * old + inject
        state[idx] = new.to(state.dtype)
    elif state.dtype == torch.float32:  # in place: no new state tensor per step
        new = state.mul_(decay).add_(inject)
    else:
        new = decay * state.float() + inject
        state.copy_(new.to(state.dtype))
    out = (new * Ch[:, :, None, :]).sum(-1)  # C . state over the state dimension (a batched matmul is slower here)
    if D is not None:
        out = out + xf * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out[:, 0] if single_head else out


def mamba2_step_float32(state, x, dt, A, B, C, D, dt_bias, dt_softplus: bool) -> torch.Tensor:
    """The Mamba-2 decode step with per-head dt and A, float32 throughout, in as few ops as it takes (at decode
    sizes each op's dispatch costs about as much as its arithmetic).

    state (b, h, p, n) updated in place, x (b, h, p), dt (b, h), A (h,), B and C (b, g, n), D (h,) or None,
    dt_bias (h,) or None. Heads are viewed as (group, head in group), so B and C broadcast over a group's heads
    instead of being repeated per head: ``state = exp(dt A) state + (dt x) B^T``, ``out = state C + D x``.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt * A)  # (b, h)
    grouped = state.view(b, g, h // g, p, n)
    grouped.mul_(decay.view(b, g, h // g, 1, 1))
    grouped.addcmul_((x * dt[..., None]).view(b, g, h // g, p, 1), B.view(b, g, 1, 1, n))
    out = (grouped * C.view(b, g, 1, 1, n)).sum(-1).view(b, h, p)  # multiply-sum: 2x faster than matmul here
    if D is not None:
        out = torch.addcmul(out, x, D[:, None])
    return out
