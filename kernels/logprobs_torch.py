"""Fused linear log-probabilities in pure torch: the CPU path of ``fused_linear_logprobs`` and its naive oracle.

From hidden states (N, H), the LM-head weight (V, H) and target ids (N,), compute per token

    logits = hidden @ weight.T / logits_scaling / temperature
    logprob = log_softmax(logits)[target]          entropy = -sum_v p_v log p_v

forward and backward, over chunks of tokens, so the (N, V) logits are never held at once: the backward recomputes
each chunk's logits from the saved hidden states (a fourth matrix product) instead of keeping them. The per-chunk
buffers are updated in place so a chunk costs about two (chunk, V) float32 buffers. This module must stay pure
torch and never import triton; ``naive_linear_logprobs`` materialises everything and is only the tests' oracle
and the benchmark's anchor.
"""

from __future__ import annotations

import torch

CHUNK_LOGITS = 48 << 20  # logits per chunk by default: 192 MiB in float32


def default_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that one chunk's logits hold at most ``CHUNK_LOGITS`` values: 448 tokens for a 100K
    vocabulary, a multiple of 64 between 16 and 4096 (CPU matrix products lose speed below a few hundred rows)."""
    tokens = CHUNK_LOGITS // max(vocab, 1)
    if tokens >= 64:
        tokens -= tokens % 64
    return max(16, min(4096, tokens))


def token_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
               logits_scaling: float, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """What both paths of ``fused_linear_logprobs`` compute on: hidden as (N, H) and targets as (N,) (checked to
    agree), the logit scale ``1 / (logits_scaling * temperature)`` and the tokens per chunk (``chunk_size``, None:
    ``default_chunk_tokens``)."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    if hidden2.shape[0] != targets1.shape[0]:
        raise ValueError(f"hidden has {hidden2.shape[0]} tokens but targets has {targets1.shape[0]}")
    chunk = default_chunk_tokens(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = 1.0 / (float(logits_scaling) * float(temperature))
    return hidden2, targets1, scale, chunk


def naive_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          logits_scaling: float = 1.0, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-logits log-probabilities and entropies (autograd does the backward). Returns (logprobs, entropy)."""
    logits = hidden @ weight.T
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / logits_scaling / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe[..., None])[..., 0] * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk, ignore_index, with_entropy):
        n = hidden.shape[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.zeros(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            # the logit scale goes on the (chunk, H) side of the product, not on the (chunk, V) logits
            z = ((hidden[start:stop] * scale) @ weight.T).to(acc)  # (c, V)
            tgt = safe[start:stop, None]
            z_t = z.gather(-1, tgt)[:, 0]
            log_p = torch.log_softmax(z, dim=-1)  # one fused pass, faster on CPU than logsumexp's three
            del z
            logp[start:stop] = log_p.gather(-1, tgt)[:, 0]
            lse[start:stop] = z_t - logp[start:stop]
            if with_entropy:  # H = -sum_v p_v log p_v
                p = torch.exp(log_p)
                entropy[start:stop] = -torch.bmm(p[:, None, :], log_p[:, :, None])[:, 0, 0]
                del p
            del log_p
        logp = logp * valid
        entropy = entropy * valid
        ctx.save_for_backward(hidden, weight, safe, valid, lse, entropy)
        ctx.scale, ctx.chunk = scale, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, safe, valid, lse, entropy = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        n = hidden.shape[0]
        # d logp_t / d z = onehot(t) - p ;  d H / d z = -p (log p + H); z = scale * raw logits.
        # Row coefficients absorb the scale, and the one-hot part is a gather / index_add on the small side, so the
        # (chunk, V) buffer only ever holds log p, then p (or p times an affine function of log p).
        g_lp = torch.zeros(n, dtype=acc, device=hidden.device) if grad_logp is None else grad_logp.to(acc) * valid
        g_lp = g_lp * scale
        use_ent = grad_entropy is not None and bool(grad_entropy.any())
        g_ent = grad_entropy.to(acc) * valid * scale if use_ent else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = hidden[start:stop]
            rows_lp = g_lp[start:stop, None]
            g = ((h * scale) @ weight.T).to(acc).sub_(lse[start:stop, None])  # log p, (c, V)
            if use_ent:
                p = torch.exp(g)
                coef = -(rows_lp + g_ent[start:stop, None] * entropy[start:stop, None])
                g.mul_(-g_ent[start:stop, None]).add_(coef).mul_(p)  # the full gradient but the one-hot part
                del p
                row_coef = None
            else:
                g.exp_()  # p; the gradient is -g_lp * p, with -g_lp applied on the small side
                row_coef = -rows_lp
            gm = g if g.dtype == weight.dtype else g.to(weight.dtype)
            del g
            onehot_rows = weight[safe[start:stop]].to(acc) * rows_lp  # (c, H): g_lp * W[target]
            if need_h:
                gh = (gm @ weight).to(acc)
                if row_coef is not None:
                    gh.mul_(row_coef)
                grad_h[start:stop] = (gh + onehot_rows).to(hidden.dtype)
            if need_w:
                hs = h.to(acc) if row_coef is None else h.to(acc) * row_coef
                grad_w.addmm_(gm.T.to(acc), hs)
                grad_w.index_add_(0, safe[start:stop], h.to(acc) * rows_lp)
            del gm
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def chunked_linear_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    logits_scaling: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """``posttrain.kernels.fused_linear_logprobs`` in torch: the log-probability of each target under
    ``hidden @ weight.T / logits_scaling / temperature``, chunked.

    hidden (N, H) (or (..., H)), weight (V, H), targets (N,) (or (...)). Returns float32 log-probs shaped like
    targets (0 where target == ignore_index), and the entropy of each token's distribution (also 0 there) if
    ``return_entropy``. Forward and backward run over ``chunk_size`` tokens at a time (None: at most 48M logits
    per chunk, 448 tokens for a 100K vocabulary), recomputing the logits in backward, so the (N, V) logits never
    exist at once. Gradients reach hidden and weight.
    """
    lead = targets.shape
    hidden2, targets1, scale, chunk = token_rows(hidden, weight, targets, temperature, logits_scaling, chunk_size)
    logp, entropy = _ChunkedLinearLogprobs.apply(hidden2, weight, targets1, scale, chunk, ignore_index, return_entropy)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, entropy.reshape(lead)
    return logp
