"""Fused linear log-probabilities on GPU: cuBLAS for the matrix products, Triton for everything over the vocabulary.

For each chunk of tokens: ``z = hidden_chunk @ weight.T`` (cuBLAS, in the input dtype), then one Triton program
per token walks the vocabulary once in blocks, with an online max: the log-sum-exp, the target's logit and
``sum_v p_v z_v`` (for the entropy). The backward recomputes the chunk's logits and overwrites them in place with
``d loss / d z`` (``(onehot - p) g_logp - p (log p + H) g_entropy``, times the logit scale), which two more matrix
products turn into the hidden and weight gradients. The (tokens, vocabulary) logits of the whole batch never exist.
Triton is imported here unconditionally: only the dispatcher may import this module, once triton is available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from posttrain.kernels.logprobs_torch import token_rows


@triton.jit
def _logprobs_fwd_kernel(
    Z, TGT, LOGP, ENT, LSE, V, stride_z, scale, ignore_index,
    BV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    tgt = tl.load(TGT + row)
    m = -float("inf")
    s0 = 0.0  # sum exp(z - m)
    s1 = 0.0  # sum exp(z - m) z
    zt = 0.0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mc = cols < V
        z = tl.load(Z + row * stride_z + cols, mask=mc, other=-float("inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.where(mc, tl.exp(z - m_new), 0.0)
        rescale = tl.exp(m - m_new)
        s0 = s0 * rescale + tl.sum(e, axis=0)
        s1 = s1 * rescale + tl.sum(e * tl.where(mc, z, 0.0), axis=0)
        zt += tl.sum(tl.where(cols == tgt, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s0)
    valid = tgt != ignore_index
    tl.store(LSE + row, lse)
    tl.store(LOGP + row, tl.where(valid, zt - lse, 0.0))
    tl.store(ENT + row, tl.where(valid, lse - s1 / s0, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    Z, TGT, LSE, ENT, GLP, GENT, V, stride_z, scale, ignore_index,
    HAS_GENT: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Overwrite the row's logits with d loss / d (raw logits)."""
    row = tl.program_id(0)
    tgt = tl.load(TGT + row)
    valid = tgt != ignore_index
    lse = tl.load(LSE + row)
    g_lp = tl.where(valid, tl.load(GLP + row), 0.0)
    if HAS_GENT:
        g_ent = tl.where(valid, tl.load(GENT + row), 0.0)
        ent = tl.load(ENT + row)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mc = cols < V
        logp = tl.load(Z + row * stride_z + cols, mask=mc, other=0.0).to(tl.float32) * scale - lse
        p = tl.exp(logp)
        coef = g_lp
        if HAS_GENT:
            coef = coef + g_ent * (logp + ent)
        g = tl.where(cols == tgt, g_lp, 0.0) - p * coef
        tl.store(Z + row * stride_z + cols, (g * scale).to(Z.dtype.element_ty), mask=mc)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk, ignore_index):
        n = hidden.shape[0]
        vocab = weight.shape[0]
        tgt = targets.to(torch.int64).contiguous()
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        ent = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        bv = min(4096, triton.next_power_of_2(vocab))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            z = hidden[start:stop] @ weight.T
            _logprobs_fwd_kernel[(stop - start,)](
                z, tgt[start:stop], logp[start:stop], ent[start:stop], lse[start:stop], vocab, z.stride(0), scale,
                ignore_index, BV=bv,
            )  # fmt: skip
            del z
        ctx.save_for_backward(hidden, weight, tgt, lse, ent)
        ctx.scale, ctx.chunk, ctx.ignore_index = scale, chunk, ignore_index
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, tgt, lse, ent = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_lp = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)
        g_ent = grad_ent.float().contiguous() if grad_ent is not None else lse
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        bv = min(4096, triton.next_power_of_2(vocab))
        for start in range(0, n, ctx.chunk):
            stop = min(start + ctx.chunk, n)
            h = hidden[start:stop]
            z = h @ weight.T
            _logprobs_bwd_kernel[(stop - start,)](
                z, tgt[start:stop], lse[start:stop], ent[start:stop], g_lp[start:stop], g_ent[start:stop], vocab,
                z.stride(0), ctx.scale, ctx.ignore_index, HAS_GENT=grad_ent is not None, BV=bv,
            )  # fmt: skip
            if need_h:
                grad_h[start:stop] = z @ weight
            if need_w:
                if z.dtype == torch.float32:
                    grad_w.addmm_(z.T, h)
                else:
                    grad_w += z.T @ h
            del z
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def fused_linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 temperature: float = 1.0, logits_scaling: float = 1.0, chunk_size: int | None = None,
                                 return_entropy: bool = False, ignore_index: int = -100):
    """``fused_linear_logprobs`` with Triton over the vocabulary; see ``posttrain.kernels.fused_linear_logprobs``."""
    lead = targets.shape
    hidden2, targets1, scale, chunk = token_rows(hidden, weight, targets, temperature, logits_scaling, chunk_size)
    logp, ent = _FusedLinearLogprobs.apply(hidden2, weight, targets1, scale, chunk, ignore_index)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp
