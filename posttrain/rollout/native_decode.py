"""The native engine's forward passes over the in-tree models (hybrid and dense Granite): the prefill of packed
prompts into a ``HybridCache`` and the decode step, one token per row.

The model (``posttrain.models.hybrid.modeling``) keeps its training forward, whose layers can also fill a
``HybridCache``; ``prefill`` here runs them that way. The decode step does not go through the modules at all: it
walks a ``DecodePlan`` of plain tensors (see "Decoding" below), whose per-call overhead is far below the modules'
at decode sizes. This module never samples, never allocates caches on its own (``posttrain.rollout.native`` does
both) and never changes the model's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.families import effective_weight
from posttrain.kernels import backend_for, causal_conv1d_update, rms_norm_gated, selective_state_update
from posttrain.kernels.conv1d_torch import conv_step_float32
from posttrain.kernels.ssd_torch import mamba2_step_float32
from posttrain.models.hybrid.configuration import HybridConfig
from posttrain.models.hybrid.modeling import (
    HybridBlock,
    HybridCache,
    HybridForCausalLM,
    causal_mask,
    cu_seqlens_from_lengths,
    rope_frequencies,
    rope_tables,
)


# ------------------------------------------------------------------------------------------------------------
# Prefill: the prompts once each, as one packed row
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill(model: HybridForCausalLM, prompts: list[list[int]], cache: HybridCache) -> torch.Tensor:
    """Run the prompts as one packed row, filling rows 0..n-1 of ``cache``; returns each prompt's last
    hidden state's logits (n, vocab)."""
    device = model.device
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    if max(lengths) > cache.max_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit a cache of {cache.max_len}")
    if len(set(lengths)) == 1:  # equal lengths: one prompt per row, no packing masks
        return _prefill_rows(model, torch.tensor(prompts, device=device), cache)
    ids = torch.tensor([t for p in prompts for t in p], device=device)[None, :]
    cu = cu_seqlens_from_lengths(lengths, device)
    seq_idx = torch.repeat_interleave(torch.arange(len(prompts), device=device, dtype=torch.int32),
                                      torch.tensor(lengths, device=device))[None, :]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None, :]
    mask = causal_mask(ids.shape[1], device, seq_idx=seq_idx) if len(prompts) > 1 else None
    h = model.model.embed_tokens(ids) * model.config.embedding_multiplier
    rope = model.rope(positions, h.dtype)
    for block in model.model.layers:
        h, _ = block(h, mask, rope, seq_idx if len(prompts) > 1 else None, None, cache=cache, cu_seqlens=cu)
    cache.lengths[: len(prompts)] = torch.tensor(lengths, device=device)
    last = model.model.norm(h[0, cu[1:].long() - 1])
    return model.lm_head(last) / model.config.logits_scaling


def _prefill_rows(model: HybridForCausalLM, ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """``prefill`` for prompts of one length, as a plain (n, length) batch filling rows 0..n-1."""
    n, length = ids.shape
    h = model.model.embed_tokens(ids) * model.config.embedding_multiplier
    rope = model.rope(torch.arange(length, device=ids.device)[None, :].expand(n, length), h.dtype)
    for block in model.model.layers:
        h, _ = block(h, None, rope, None, None, cache=cache)
    cache.lengths[:n] = length
    return model.lm_head(model.model.norm(h[:, -1])) / model.config.logits_scaling


# ------------------------------------------------------------------------------------------------------------
# Decoding: one token per row, walking a plan of plain tensors
# ------------------------------------------------------------------------------------------------------------
# At decode sizes each op's dispatch costs about as much as its arithmetic, so the step does not go through the
# modules: ``DecodePlan`` lays out, per layer, the tensors the step needs, and the step calls torch
# on them directly. Where it is cheap the plan also derives weights: each RMSNorm's weight folded into the projection
# after it (the norm is then a per-row factor, applied after the matmul: r * (x @ W^T) = (r * x) @ W^T), q, k and v
# fused into one matmul with the attention scale folded into q, dt_bias folded into in_proj's bias, 1/logits_scaling
# into the LM head. Derived weights are copies made when the plan is built, so a plan must never outlive a change of
# the weights: build one per generate() call (the RL loop changes the weights between calls). Copies are made only
# while they stay under FOLD_MAX_BYTES; past that, the plan uses the parameters as they are (no second copy of a
# large model) and applies the norm weights and scales as extra multiplications.
FOLD_MAX_BYTES = 256 * 1024**2


def _rms_factor(h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """1 / RMS of each row of h (batch, hidden), as (batch, 1): RMSNorm(h) = h * factor * weight; eps a 0-d tensor.

    ``rsqrt(|h|^2 / n + eps)`` from the vector norm: three ops where ``pow, mean, add, rsqrt`` take five (mean is a
    sum and a division), and at decode sizes every op costs several microseconds whatever its size."""
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return torch.addcmul(eps, norm, norm, value=1.0 / h.shape[-1]).rsqrt_()


def _eps_tensor(config: HybridConfig, module: nn.Module) -> torch.Tensor:
    weight = next(module.parameters())
    return torch.tensor(config.rms_norm_eps, dtype=weight.dtype, device=weight.device)


class _NormedLinear:
    """``linear(rmsnorm(h) [* scale], W, b)`` for a row factor ``r`` from ``_rms_factor``: ``r * (h @ W'^T) + b``,
    with the norm weight (and ``scale``) folded into W' when folding, else multiplied into h first. Several weights
    (q, k, v) give their outputs side by side."""

    def __init__(self, weights: list[torch.Tensor], norm_weight: torch.Tensor | None, bias: torch.Tensor | None,
                 fold: bool, scale: float = 1.0):
        if fold:
            w = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
            w = w * norm_weight if norm_weight is not None else w.clone()
            if scale != 1.0:
                w.mul_(scale)
            self.weights, self.norm_weight, self.scale = [w.t()], None, 1.0
        else:
            self.weights, self.norm_weight, self.scale = [w.t() for w in weights], norm_weight, scale
        self.bias = bias if bias is None or scale == 1.0 else bias * scale
        self.plain = self.bias is None and self.norm_weight is None and len(self.weights) == 1 and self.scale == 1.0

    def __call__(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.plain:  # the folded case, every layer's: one matmul and the row factor in place
            return torch.mm(h, self.weights[0]).mul_(r)
        x = h if self.norm_weight is None else h * self.norm_weight
        y = torch.mm(x, self.weights[0]) if len(self.weights) == 1 else torch.cat([x @ w for w in self.weights], -1)
        if self.scale != 1.0:
            r = r * self.scale
        return y.mul_(r) if self.bias is None else torch.addcmul(self.bias, y, r)

    def residual(self, h: torch.Tensor, x: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
        """``h + alpha * self(x, r)``, in one op after the matmul when there is no bias."""
        if not self.plain:
            return torch.add(h, self(x, r), alpha=alpha)
        return torch.addcmul(h, torch.mm(x, self.weights[0]), r, value=alpha)


def _residual_linear(h: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                     alpha: float) -> torch.Tensor:
    """``h + alpha * linear(x, W, b)`` with ``weight_t`` = W^T: one addmm."""
    out = torch.addmm(h, x, weight_t, alpha=alpha)
    return out if bias is None else out.add_(bias, alpha=alpha)


class _MambaStep:
    """Input RMSNorm, in_proj, the conv window's step, the SSM's recurrent step, gated RMSNorm, out_proj, residual."""

    def __init__(self, block: HybridBlock, config: HybridConfig, fold: bool):
        m = block.mamba
        self.layer, self.eps, self.alpha = block.layer, _eps_tensor(config, block), block.residual_multiplier
        self.inner, self.conv_dim, self.n_heads = m.inner, m.conv_dim, m.n_heads
        self.n_groups, self.d_head, self.d_state = m.n_groups, m.d_head, m.d_state
        bias = torch.zeros(m.in_proj.out_features, dtype=m.in_proj.weight.dtype, device=m.in_proj.weight.device)
        if m.in_proj.bias is not None:
            bias += m.in_proj.bias
        bias[-m.n_heads:] += m.dt_bias  # dt + dt_bias comes out of the projection
        self.in_proj = _NormedLinear([effective_weight(m.in_proj)], block.input_layernorm.weight, bias, fold)
        # (conv_dim, width) with width-major memory, as the time-major conv window wants it (a small copy)
        self.conv_weight, self.conv_bias = m.conv1d.weight[:, 0, :].t().contiguous().t(), m.conv1d.bias
        self.A = -torch.exp(m.A_log.float())
        self.D = m.D
        lo, hi = m.dt_limit
        self.dt_limit = None if lo <= 0.0 and hi == float("inf") else (lo, hi)
        self.fast = (backend_for(m.in_proj.weight) == "torch" and m.in_proj.weight.dtype == torch.float32
                     and m.D.dtype == torch.float32)
        self.norm_weight, self.norm_group, self.norm_eps = m.norm.weight, m.norm.group_size, m.norm.eps
        if m.norm.group_size == m.inner:  # one norm group: a row factor, its weight folded into out_proj
            self.out_proj = _NormedLinear([effective_weight(m.out_proj)], m.norm.weight, m.out_proj.bias, fold)
        else:
            self.out_proj = None
            self.out_weight_t, self.out_bias = effective_weight(m.out_proj).t(), m.out_proj.bias

    def __call__(self, h: torch.Tensor, cache: HybridCache, rope, span: tuple[int, int] | None) -> torch.Tensor:
        b, inner, gn = h.shape[0], self.inner, self.n_groups * self.d_state
        zxbcdt = self.in_proj(h, _rms_factor(h, self.eps))
        z, xbc, dt = zxbcdt[:, :inner], zxbcdt[:, inner:inner + self.conv_dim], zxbcdt[:, inner + self.conv_dim:]
        conv_state, state = cache.conv[self.layer], cache.ssm[self.layer]
        softplus = self.dt_limit is None
        if not softplus:
            dt = F.softplus(dt).clamp(*self.dt_limit)
        if self.fast:
            xbc = conv_step_float32(xbc, conv_state, self.conv_weight, self.conv_bias, "silu")
            x = xbc[:, :inner].view(b, self.n_heads, self.d_head)
            B, C = xbc[:, inner:inner + gn], xbc[:, inner + gn:]
            y = mamba2_step_float32(state, x, dt, self.A, B.view(b, self.n_groups, self.d_state),
                                    C.view(b, self.n_groups, self.d_state), self.D, None, softplus)
        else:
            xbc = causal_conv1d_update(xbc, conv_state, self.conv_weight, self.conv_bias, activation="silu")
            p, n = self.d_head, self.d_state
            x = xbc[:, :inner].reshape(b, self.n_heads, p)
            B, C = xbc[:, inner:inner + gn], xbc[:, inner + gn:]
            y = selective_state_update(
                state, x, dt[:, :, None].expand(b, self.n_heads, p), self.A[:, None, None].expand(self.n_heads, p, n),
                B.reshape(b, self.n_groups, n), C.reshape(b, self.n_groups, n),
                D=self.D[:, None].expand(self.n_heads, p), dt_softplus=softplus)
        y = y.reshape(b, inner)
        if self.out_proj is not None:
            g = y * F.silu(z)
            return self.out_proj.residual(h, g, _rms_factor(g, self.eps), self.alpha)
        g = rms_norm_gated(y, self.norm_weight, z, eps=self.norm_eps, group_size=self.norm_group)
        return _residual_linear(h, g, self.out_weight_t, self.out_bias, self.alpha)


class _AttentionStep:
    """Input RMSNorm, fused q/k/v, RoPE if any, the KV cache write, attention over the cached keys, o_proj, residual."""

    def __init__(self, block: HybridBlock, config: HybridConfig, fold: bool):
        a = block.self_attn
        self.layer, self.eps, self.alpha = block.layer, _eps_tensor(config, block), block.residual_multiplier
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv, a.head_dim
        self.split = [a.n_heads * a.head_dim, a.n_kv * a.head_dim, a.n_kv * a.head_dim]
        biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
        bias = None if a.q_proj.bias is None else torch.cat(
            [biases[0] * (a.scale if fold else 1.0), biases[1], biases[2]])
        self.qkv = _NormedLinear([effective_weight(p) for p in (a.q_proj, a.k_proj, a.v_proj)],
                                 block.input_layernorm.weight, bias, fold)
        self.scale = 1.0 if fold else a.scale
        if fold:  # the attention scale goes into q's weight and bias (q's part of the bias is scaled already)
            self.qkv.weights[0][:, : a.n_heads * a.head_dim].mul_(a.scale)
        self.out_weight_t, self.out_bias = effective_weight(a.o_proj).t(), a.o_proj.bias

    def __call__(self, h: torch.Tensor, cache: HybridCache, rope, span: tuple[int, int] | None) -> torch.Tensor:
        b, heads, kv, d = h.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv(h, _rms_factor(h, self.eps))  # a fresh tensor: rotated in place below
        if rope is not None:  # q and k rotated together, in place (see DecodePlan.step for the halves' swap)
            cos, sin_signed = rope
            qk = qkv[:, : (heads + kv) * d].view(b, heads + kv, 1, d)
            swapped = qk.view(b, heads + kv, 1, 2, d // 2).flip(-2).view(b, heads + kv, 1, d)  # flip copies
            qk.mul_(cos).addcmul_(swapped, sin_signed)
        q, k, v = qkv.split(self.split, dim=1)
        q = q.view(b, kv, heads // kv, d)  # each kv head serves heads // kv consecutive q heads
        k, v = k.view(b, kv, d), v.view(b, kv, d)
        key, value, pos = cache.key[self.layer], cache.value[self.layer], cache.lengths
        first, last = span  # the rows' shortest and longest lengths before this token
        if first == last:  # every row at the same position: plain slices, no mask
            key.select(2, last).copy_(k)
            value.select(2, last).copy_(v)
            mask = None
        else:
            rows = torch.arange(b, device=h.device)
            key[rows, :, pos] = k
            value[rows, :, pos] = v
            mask = (torch.arange(last + 1, device=h.device)[None, :] <= pos[:, None])[:, None, None, :]  # True: seen
        # grouped-query attention without repeating the keys, (b, kv, heads // kv, d)
        out = F.scaled_dot_product_attention(q, key[:, :, : last + 1], value[:, :, : last + 1], attn_mask=mask,
                                             scale=self.scale)
        return _residual_linear(h, out.reshape(b, heads * d), self.out_weight_t, self.out_bias, self.alpha)


class _FeedForwardStep:
    """Post-attention RMSNorm, the shared SwiGLU MLP (plus the mixture of experts, if any), residual."""

    def __init__(self, block: HybridBlock, config: HybridConfig, fold: bool):
        self.eps, self.alpha, self.moe = _eps_tensor(config, block), block.residual_multiplier, block.block_sparse_moe
        self.norm_weight = block.post_attention_layernorm.weight
        self.down_bias = None
        if block.dense:  # gate and up side by side, as the fused weight has them
            mlp = block.mlp
            bias = None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            self.up = _NormedLinear([effective_weight(mlp.gate_proj), effective_weight(mlp.up_proj)], self.norm_weight, bias, fold)
            self.down_t, self.down_bias = effective_weight(mlp.down_proj).t(), mlp.down_proj.bias
            return
        mlp = block.shared_mlp
        # with experts, the router and the experts read the normed input too: it is made once, nothing is folded
        self.up = _NormedLinear([effective_weight(mlp.input_linear)], None if self.moe else self.norm_weight, None,
                                fold and self.moe is None)
        self.down_t = effective_weight(mlp.output_linear).t()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        r = _rms_factor(h, self.eps)
        if self.moe is None:
            gate, up = self.up(h, r).chunk(2, dim=-1)
            return _residual_linear(h, F.silu(gate).mul_(up), self.down_t, self.down_bias, self.alpha)
        x = (h * r) * self.norm_weight
        gate, up = torch.mm(x, self.up.weights[0]).chunk(2, dim=-1)
        out = torch.addmm(self.moe(x)[0], F.silu(gate).mul_(up), self.down_t)
        return torch.add(h, out, alpha=self.alpha)


class DecodePlan:
    """What one decode step needs, laid out once per generate() call (see the comment above): build one per call
    and never keep it across a change of the weights. ``fold`` (default: when the copies are cheap) folds norm
    weights and scales into the projections. A projection with peft LoRA adapters enters with its adapters applied
    (``posttrain.families.effective_weight``), as the modules' forward (the prefill) applies them."""

    def __init__(self, model: HybridForCausalLM, fold: bool | None = None):
        c = model.config
        if fold is None:
            size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
            fold = model.dtype in (torch.float32, torch.float64) and size <= FOLD_MAX_BYTES
        self.fold = fold
        self.embedding, self.embedding_multiplier = model.model.embed_tokens.weight, c.embedding_multiplier
        self.layers = []
        for block in model.model.layers:
            mixer = (_MambaStep if block.kind == "mamba" else _AttentionStep)(block, c, fold)
            self.layers.append((mixer, _FeedForwardStep(block, c, fold)))
        self.attention = any(isinstance(mixer, _AttentionStep) for mixer, _ in self.layers)
        self.eps = _eps_tensor(c, model)
        self.head = _NormedLinear([model.lm_head.weight], model.model.norm.weight, None, fold,
                                  scale=1.0 / c.logits_scaling)
        self.rope = rope_frequencies(c, model.device) if c.position_embedding_type == "rope" else None
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def _rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions 0..length-1, as (length, 1, 1, head_dim) tables made once per plan.

        RoPE's x * cos + cat(-x2, x1) * sin is computed as x * cos + cat(x2, x1) * cat(-sin1, sin2): the halves'
        swap is one flip, and the sign is in the table instead of in x in every layer (exact: a sign)."""
        if self.rope_tables is None or self.rope_tables[0].shape[0] < length or self.rope_tables[0].dtype != dtype:
            positions = torch.arange(length, device=self.embedding.device)
            cos, sin = rope_tables(positions[:, None], self.rope, dtype)  # (length, 1, 1, head_dim), as the model's
            half = sin.shape[-1] // 2
            self.rope_tables = cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return self.rope_tables

    def step(self, input_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One new token per row of ``cache``: input_ids (batch,) -> next-token logits (batch, vocab)."""
        h = F.embedding(input_ids, self.embedding) * self.embedding_multiplier
        rope = None
        if self.rope is not None:  # the new token's position in each row, looked up in the plan's tables
            cos, sin_signed = self._rope_tables(cache.max_len, h.dtype)
            rope = cos[cache.lengths], sin_signed[cache.lengths]
        # the rows' shortest and longest lengths, read once per step for every attention layer
        span = tuple(int(p) for p in torch.aminmax(cache.lengths)) if self.attention else None
        for mixer, feed_forward in self.layers:
            h = feed_forward(mixer(h, cache, rope, span))
        cache.lengths += 1
        return self.head(h, _rms_factor(h, self.eps))
