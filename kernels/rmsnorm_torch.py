"""Gated RMSNorm in pure torch: the CPU path of ``rms_norm_gated`` and the oracle of its Triton kernel.

With ``norm_before_gate=False`` (GraniteMoeHybridRMSNormGated): ``y = x * silu(z)``, then each group of
``group_size`` channels of the last dim is divided by its root mean square, times ``weight``. With
``norm_before_gate=True`` the gate multiplies after the norm. Computed in float32 (float64 stays float64) and
returned in x's dtype. It must stay pure torch and never import triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_gated_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """``posttrain.kernels.rms_norm_gated`` in torch: RMSNorm of ``x * silu(z)`` over groups of ``group_size``
    channels (None: the whole last dim), times ``weight`` (``norm_before_gate=True``: gate after the norm). Float32
    inside, returned in x's dtype."""
    dim = x.shape[-1]
    group = dim if group_size is None else group_size
    if group == dim and x.dtype == weight.dtype == torch.float32 and (z is None or z.dtype == torch.float32):
        # one norm group in float32: torch's fused RMSNorm (same formula, a few ops fewer per call)
        if z is None:
            return F.rms_norm(x, (dim,), weight, eps)
        if norm_before_gate:
            return F.rms_norm(x, (dim,), weight, eps) * F.silu(z)
        return F.rms_norm(x * F.silu(z), (dim,), weight, eps)
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdtype)
    if dim % group != 0:
        raise ValueError(f"group_size {group} does not divide the last dim {dim}")
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cdtype))
    grouped = h.unflatten(-1, (dim // group, group))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    h = grouped.flatten(-2) * weight.to(cdtype)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cdtype))
    return h.to(x.dtype)
