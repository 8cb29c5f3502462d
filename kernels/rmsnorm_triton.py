"""Gated RMSNorm in Triton, forward and backward: the GPU path of ``rms_norm_gated``.

Rows of ``group_size`` channels: ``u = x * silu(z)`` (gate first, the Granite/transformers order) or ``u = x``,
``out = u * rstd(u) * w`` (times ``silu(z)`` when the gate comes after the norm). The forward saves one ``rstd``
per row; the backward recomputes ``u`` and writes per-program partial sums of the weight gradient, which torch adds
up. Each program walks rows ``pid, pid + nprog, ...`` with ``nprog`` a multiple of the groups per token, so it only
ever touches one slice of the weight. Triton is imported here unconditionally: only the dispatcher may import this
module, once triton is known to be available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(
    X, Z, WT, OUT, RSTD, rows, G, ngroups, eps, nprog,
    HAS_Z: tl.constexpr, GATE_AFTER: tl.constexpr, BG: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BG)
    mc = cols < G
    w = tl.load(WT + (pid % ngroups) * G + cols, mask=mc, other=0.0).to(tl.float32)
    for r in range(pid, rows, nprog):
        x = tl.load(X + r * G + cols, mask=mc, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + r * G + cols, mask=mc, other=0.0).to(tl.float32)
            if not GATE_AFTER:
                x = x * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / G + eps)
        y = x * rstd * w
        if HAS_Z and GATE_AFTER:
            y = y * z * tl.sigmoid(z)
        tl.store(RSTD + r, rstd)
        tl.store(OUT + r * G + cols, y.to(OUT.dtype.element_ty), mask=mc)


@triton.jit
def _rmsnorm_bwd(
    X, Z, WT, RSTD, DOUT, DX, DZ, DW_PART, rows, G, ngroups, nprog,
    HAS_Z: tl.constexpr, GATE_AFTER: tl.constexpr, BG: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BG)
    mc = cols < G
    w = tl.load(WT + (pid % ngroups) * G + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((BG,), dtype=tl.float32)
    for r in range(pid, rows, nprog):
        x = tl.load(X + r * G + cols, mask=mc, other=0.0).to(tl.float32)
        g = tl.load(DOUT + r * G + cols, mask=mc, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        u = x
        if HAS_Z:
            z = tl.load(Z + r * G + cols, mask=mc, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            if not GATE_AFTER:
                u = x * z * sig
        yhat = u * rstd
        if HAS_Z and GATE_AFTER:
            # out = yhat * w * silu(z)
            tl.store(DZ + r * G + cols, g * yhat * w * sig * (1.0 + z * (1.0 - sig)), mask=mc)
            g = g * z * sig
        dw += g * yhat
        dyhat = g * w
        du = rstd * (dyhat - yhat * (tl.sum(dyhat * yhat, axis=0) / G))
        if HAS_Z and not GATE_AFTER:
            tl.store(DZ + r * G + cols, du * x * sig * (1.0 + z * (1.0 - sig)), mask=mc)
            du = du * z * sig
        tl.store(DX + r * G + cols, du, mask=mc)
    tl.store(DW_PART + pid * G + cols, dw, mask=mc)


def _programs(rows: int, ngroups: int) -> int:
    target = max(1, min(rows, 1024))
    return max(ngroups, (target // ngroups) * ngroups)


class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, eps, group, gate_after):
        dim = x.shape[-1]
        ngroups = dim // group
        x2 = x.reshape(-1, dim).contiguous()
        z2 = z.reshape(-1, dim).contiguous() if z is not None else x2
        rows = x2.shape[0] * ngroups
        out = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        nprog = _programs(rows, ngroups)
        _rmsnorm_fwd[(nprog,)](
            x2, z2, weight, out, rstd, rows, group, ngroups, eps, nprog,
            HAS_Z=z is not None, GATE_AFTER=gate_after, BG=triton.next_power_of_2(group),
        )  # fmt: skip
        ctx.save_for_backward(x2, z2 if z is not None else None, weight, rstd)
        ctx.meta = (x.shape, group, ngroups, gate_after, nprog)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, z2, weight, rstd = ctx.saved_tensors
        shape, group, ngroups, gate_after, nprog = ctx.meta
        rows = rstd.shape[0]
        dx = torch.empty(x2.shape, device=x2.device, dtype=torch.float32)
        dz = torch.empty_like(dx) if z2 is not None else None
        dw_part = torch.empty(nprog, group, device=x2.device, dtype=torch.float32)
        _rmsnorm_bwd[(nprog,)](
            x2, z2 if z2 is not None else x2, weight, rstd, dout.reshape(x2.shape).contiguous(), dx,
            dz if dz is not None else dx, dw_part, rows, group, ngroups, nprog,
            HAS_Z=z2 is not None, GATE_AFTER=gate_after, BG=triton.next_power_of_2(group),
        )  # fmt: skip
        dw = dw_part.view(nprog // ngroups, ngroups * group).sum(0).to(weight.dtype)
        dz_out = dz.to(z2.dtype).view(shape) if dz is not None else None
        return dx.to(x2.dtype).view(shape), dw, dz_out, None, None, None


def rms_norm_gated_triton(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None, eps: float = 1e-6,
                          group_size: int | None = None, norm_before_gate: bool = False) -> torch.Tensor:
    """``rms_norm_gated`` on Triton; see ``posttrain.kernels.rms_norm_gated``."""
    dim = x.shape[-1]
    group = dim if group_size is None else group_size
    if dim % group != 0:
        raise ValueError(f"group_size {group} does not divide the last dim {dim}")
    return _RMSNormGated.apply(x, weight, z, float(eps), group, bool(norm_before_gate))
