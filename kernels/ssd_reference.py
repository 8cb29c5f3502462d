"""The Mamba-2 selective state space recurrence, token by token: the tests' oracle.

This is the definition the chunked torch path (``ssd_torch``) and the Triton kernels (``ssd_triton``) are checked
against. It reads like the paper's recurrence, one token at a time, in float64::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (per head: h is headdim x dstate)
    y_t = h_t C_t + D * x_t

with the state reset to zero where ``seq_idx`` changes (packed sequences) and ``initial_states`` used as the state
before the first token of the first sequence only. It is slow (a Python loop over tokens) and must never be used
outside tests and small debugging runs. It shares no code with what it checks: it must never import ``ssd_common``,
``ssd_torch`` or ``ssd_triton``, and they must never import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]
) -> torch.Tensor:
    """The step size by its definition: softplus(dt + dt_bias) if asked, clamped to ``dt_limit`` when its low end
    is above 0 or its high end finite (the default (0, inf) leaves dt as it is, negative without softplus)."""
    dt = dt if dt_bias is None else dt + dt_bias.to(dt.dtype)
    dt = F.softplus(dt) if dt_softplus else dt
    low, high = dt_limit
    return dt.clamp(min=low, max=high) if low > 0.0 or high != float("inf") else dt


def ssd_sequential_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                             seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                             dt_softplus: bool = False,
                             dt_limit: tuple[float, float] = (0.0, float("inf"))) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the recurrence token by token in float64.

    Shapes as ``mamba_chunk_scan_combined``. Returns ``(out, final_states, varlen_states)``; ``varlen_states`` is
    the state after the last token of each sequence of ``cu_seqlens`` (batch 1), else None.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    dt = prepare_dt(dt, None if dt_bias is None else dt_bias.double(), dt_softplus, dt_limit)
    # Each head reads the B and C of its group.
    B = B.repeat_interleave(heads_per_group, dim=2)  # (batch, seqlen, nheads, dstate)
    C = C.repeat_interleave(heads_per_group, dim=2)

    state = torch.zeros(batch, nheads, headdim, dstate, dtype=torch.float64, device=x.device)
    if initial_states is not None:
        state = initial_states.double().clone()
    states_after = []
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            # A new packed sequence starts from a zero state.
            new_sequence = (seq_idx[:, t] != seq_idx[:, t - 1]).double()[:, None, None, None]
            state = state * (1.0 - new_sequence)
        decay = torch.exp(dt[:, t] * A)  # (batch, nheads)
        inject = torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        state = decay[:, :, None, None] * state + inject
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            d = D.double()
            y = y + (d[:, None] if d.dim() == 1 else d) * x[:, t]
        ys.append(y)
        states_after.append(state)
    out = torch.stack(ys, dim=1)
    if z is not None:
        out = out * F.silu(z.double())
    varlen_states = None
    if cu_seqlens is not None:
        ends = [int(e) - 1 for e in cu_seqlens[1:].tolist()]
        varlen_states = torch.stack([states_after[e][0] for e in ends], dim=0)
    return out, state, varlen_states
