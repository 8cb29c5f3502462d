"""The pieces the two production SSD paths share: the step size, the per-sequence final states of a packed row, what
``mamba_chunk_scan_combined`` returns, and the head axis a decode step may be given without.

``ssd_torch`` (CPU) and ``ssd_triton`` (GPU) both import these, so the two paths cannot drift apart on them. Pure
torch: this module must never import triton, and the tests' oracle ``ssd_reference`` must never import it (an
oracle that shares code with what it checks would check nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def prepare_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
) -> torch.Tensor:
    """The step size every SSD path uses: softplus(dt + dt_bias) if asked, clamped to ``dt_limit``."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit[0] > 0.0 or dt_limit[1] != float("inf"):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def varlen_states(
    cu_seqlens: torch.Tensor,
    entering: torch.Tensor,
    dA_cum: torch.Tensor,
    x_dt: torch.Tensor,
    B: torch.Tensor,
    seq_idx: torch.Tensor | None,
    heads_per_group: int,
    Q: int,
) -> torch.Tensor:
    """The state after the last token of each sequence of a packed row (batch 1).

    entering (h, c, p, n), dA_cum (h, c, l), x_dt (c, l, h, p), B (c, l, g, n).
    """
    ends = (cu_seqlens[1:].long() - 1).to(entering.device)  # (s,)
    chunk = ends // Q
    pos = ends % Q
    lpos = torch.arange(Q, device=entering.device)
    cum_end = dA_cum[:, chunk, pos]  # (h, s)
    cum_chunk = dA_cum[:, chunk]  # (h, s, l)
    # Tokens of the end's chunk up to the end, in the end's sequence.
    keep = lpos[None, :] <= pos[:, None]  # (s, l)
    if seq_idx is not None:
        seq = seq_idx[0].long()
        nt = seq.shape[0]
        tok = (chunk[:, None] * Q + lpos[None, :]).clamp(max=nt - 1)
        keep = keep & (seq[tok] == seq[ends][:, None])
        seq_first = seq[:1]
        seq_enter = torch.cat([seq_first, seq[(torch.arange(1, entering.shape[1], device=seq.device) * Q - 1)]])
        enter_ok = (seq_enter[chunk] == seq[ends]).to(entering.dtype)  # (s,)
    else:
        enter_ok = torch.ones_like(ends, dtype=entering.dtype)
    w = torch.exp((cum_end[..., None] - cum_chunk).masked_fill(~keep[None], float("-inf")))  # (h, s, l)
    xs = x_dt[chunk]  # (s, l, h, p)
    Bs = B[chunk].repeat_interleave(heads_per_group, dim=2)  # (s, l, h, n)
    inner = torch.einsum("hsl,slhp,slhn->shpn", w, xs, Bs)
    carried = entering[:, chunk].permute(1, 0, 2, 3) * (torch.exp(cum_end).T * enter_ok[:, None])[..., None, None]
    return inner + carried


def chunk_scan_outputs(out: torch.Tensor, final: Callable[[], torch.Tensor], varlen: Callable[[], torch.Tensor],
                       return_final_states: bool, return_varlen_states: bool, cu_seqlens: torch.Tensor | None,
                       batch: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``out``, then ``final()`` if ``return_final_states``, then ``varlen()`` if ``return_varlen_states`` (which
    needs ``cu_seqlens`` and a batch of 1: checked before it is called): a tuple when more than ``out``."""
    results = [out]
    if return_final_states:
        results.append(final())
    if return_varlen_states:
        if cu_seqlens is None:
            raise ValueError("return_varlen_states=True needs cu_seqlens")
        if batch != 1:
            raise ValueError(f"return_varlen_states needs batch 1 (a packed row), got batch {batch}")
        results.append(varlen())
    return results[0] if len(results) == 1 else tuple(results)


def add_head_axis(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, ...]:
    """The arguments of a decode step given without a head axis (x (batch, dim), as mamba_ssm also accepts), as views
    with a head axis of 1, in the same order."""
    return (state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None],
            None if D is None else D[None], None if z is None else z[:, None],
            None if dt_bias is None else dt_bias[None])
