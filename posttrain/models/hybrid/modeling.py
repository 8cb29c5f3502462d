"""The Granite 4.0-H hybrid: Mamba-2 mixers and GQA attention layers, a shared MLP and an optional mixture of experts.
Dense Granite (``DenseGraniteConfig``, transformers' ``granite``) is the same model with attention in every layer,
RoPE, and a ``DenseMLP`` (``mlp.{gate,up,down}_proj``) in place of the fused shared MLP.

One small module per idea (gated norm, Mamba-2 mixer, attention, MLP, MoE, block, model), each forward readable
top to bottom. Parameter names are exactly those of published Granite 4.0-H checkpoints (what transformers writes
and vLLM loads), so ``state_dict()`` *is* the checkpoint layout. The heavy lifting (chunked SSD scan, causal conv,
gated RMSNorm, fused log-probabilities) goes through ``posttrain.kernels``, which picks Triton on CUDA and the
torch path elsewhere.

Its forward takes full sequences: a padded batch (attention mask with zeros) or packed rows (``position_ids``
restarting at 0 at each sequence start, no padding), never both; its layers can also fill a ``HybridCache`` (the
per-row generation state). This module never samples and never allocates caches on its own: generation (prefill,
decode step) belongs to the native engine, ``posttrain.rollout.native_decode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.kernels import (
    causal_conv1d_fn,
    fused_linear_logprobs,
    mamba_chunk_scan_combined,
    rms_norm_gated,
)
from posttrain.models.hybrid.configuration import DenseGraniteConfig, HybridConfig


# ------------------------------------------------------------------------------------------------------------
# Packing helpers
# ------------------------------------------------------------------------------------------------------------
def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed sequence each token belongs to: a new sequence starts wherever the position is 0."""
    starts = position_ids == 0
    starts[:, 0] = False
    return torch.cumsum(starts.to(torch.int32), dim=1, dtype=torch.int32)


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


# ------------------------------------------------------------------------------------------------------------
# The generation state
# ------------------------------------------------------------------------------------------------------------
@dataclass
class HybridCache:
    """Per-row generation state: conv window + SSM state for Mamba layers, a KV cache for attention layers only.

    The Mamba state has a fixed size per row whatever the number of tokens; the KV cache is preallocated to
    ``max_len`` tokens. ``lengths[i]`` is the number of tokens row ``i`` has seen.
    """

    conv: dict[int, torch.Tensor]  # layer -> (batch, conv_dim, d_conv - 1)
    ssm: dict[int, torch.Tensor]  # layer -> (batch, n_heads, d_head, d_state), float32
    key: dict[int, torch.Tensor]  # layer -> (batch, kv_heads, max_len, head_dim)
    value: dict[int, torch.Tensor]
    lengths: torch.Tensor  # (batch,) int64
    max_len: int

    @classmethod
    def allocate(cls, config: HybridConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> HybridCache:
        c = config
        # stored time-major, seen as (batch, conv_dim, d_conv - 1): the decode step reads whole time slices
        conv = {i: torch.zeros(batch, c.mamba_d_conv - 1, c.mamba_conv_dim, device=device, dtype=dtype).transpose(1, 2)
                for i in c.mamba_layers}
        ssm = {i: torch.zeros(batch, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, device=device,
                              dtype=torch.float32) for i in c.mamba_layers}
        kv_shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        key = {i: torch.zeros(kv_shape, device=device, dtype=dtype) for i in c.attention_layers}
        value = {i: torch.zeros(kv_shape, device=device, dtype=dtype) for i in c.attention_layers}
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(conv, ssm, key, value, lengths, max_len)

    @staticmethod
    def bytes_per_row(config: HybridConfig, max_len: int, dtype_bytes: int = 2) -> int:
        """Size formula of one row's state: what ``allocate`` reserves, without allocating it."""
        c = config
        mamba = 0 if not c.mamba_layers else len(c.mamba_layers) * (c.mamba_conv_dim * (c.mamba_d_conv - 1) * dtype_bytes
                                       + c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state * 4)
        attention = len(c.attention_layers) * 2 * c.num_key_value_heads * max_len * c.head_dim * dtype_bytes
        return mamba + attention

    def nbytes(self) -> int:
        tensors = [*self.conv.values(), *self.ssm.values(), *self.key.values(), *self.value.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_select(self, rows: torch.Tensor) -> HybridCache:
        """A cache holding only ``rows`` (in that order, repeats allowed): drops finished rows or copies a
        prefilled prompt's state G ways."""
        return HybridCache(
            conv={k: v.transpose(1, 2).index_select(0, rows).transpose(1, 2) for k, v in self.conv.items()},
            ssm={k: v.index_select(0, rows) for k, v in self.ssm.items()},
            key={k: v.index_select(0, rows) for k, v in self.key.items()},
            value={k: v.index_select(0, rows) for k, v in self.value.items()},
            lengths=self.lengths.index_select(0, rows),
            max_len=self.max_len,
        )


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same formula, fused
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), over groups of ``group_size`` channels."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rms_norm_gated(y, self.weight, z, eps=self.eps, group_size=self.group_size)


class Mamba2Mixer(nn.Module):
    """Mamba-2: input projection to (z, x, B, C, dt), causal depthwise conv over (x, B, C), the selective SSM
    (chunked scan for sequences, one recurrent step for decoding), gated RMSNorm by z, output projection."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        c = config
        self.n_heads, self.d_head, self.d_state = c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state
        self.n_groups, self.d_conv, self.chunk_size = c.mamba_n_groups, c.mamba_d_conv, c.mamba_chunk_size
        self.inner = c.mamba_intermediate_size
        self.conv_dim = c.mamba_conv_dim
        self.dt_limit = tuple(c.time_step_limit)
        self.in_proj = nn.Linear(c.hidden_size, self.inner + self.conv_dim + self.n_heads, bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.mamba_d_conv, groups=self.conv_dim,
                                padding=c.mamba_d_conv - 1, bias=c.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        group = self.inner // self.n_groups if c.mamba_norm_per_group else self.inner
        self.norm = GatedRMSNorm(self.inner, group, c.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner, c.hidden_size, bias=c.mamba_proj_bias)

    def forward(self, h: torch.Tensor, seq_idx: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                cache: HybridCache | None = None, layer: int = -1, cu_seqlens: torch.Tensor | None = None):
        b, l, _ = h.shape
        if pad_mask is not None:  # padded positions carry nothing into the conv window or the state
            h = h * pad_mask[..., None].to(h.dtype)
        z, xbc, dt = self.in_proj(h).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        conv_in = xbc
        xbc = causal_conv1d_fn(xbc.transpose(1, 2), self.conv1d.weight[:, 0, :], self.conv1d.bias,
                               seq_idx=seq_idx, activation="silu").transpose(1, 2)
        if pad_mask is not None:
            xbc = xbc * pad_mask[..., None].to(xbc.dtype)
        gn = self.n_groups * self.d_state
        x, B, C = xbc.split([self.inner, gn, gn], dim=-1)
        x = x.reshape(b, l, self.n_heads, self.d_head)
        B, C = B.reshape(b, l, self.n_groups, self.d_state), C.reshape(b, l, self.n_groups, self.d_state)
        A = -torch.exp(self.A_log.float())
        packed_prefill = cache is not None and cu_seqlens is not None
        result = mamba_chunk_scan_combined(
            x, dt, A, B, C, self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, seq_idx=seq_idx,
            cu_seqlens=cu_seqlens, dt_softplus=True, dt_limit=self.dt_limit,
            return_varlen_states=packed_prefill, return_final_states=cache is not None and not packed_prefill,
        )
        if packed_prefill:  # prefill of packed prompts: keep each sequence's final SSM state and conv window
            y, varlen_states = result
            cache.ssm[layer].copy_(varlen_states)
            cache.conv[layer].copy_(_last_windows(conv_in[0], cu_seqlens, self.d_conv - 1))
        elif cache is not None:  # prefill of equal-length prompts, one per row: the same, batched
            y, final_states = result
            cache.ssm[layer][:b].copy_(final_states)
            width = self.d_conv - 1
            cache.conv[layer][:b].copy_(F.pad(conv_in, (0, 0, max(0, width - l), 0))[:, -width:].transpose(1, 2))
        else:
            y = result
        y = self.norm(y.reshape(b, l, self.inner), z)
        return self.out_proj(y)


def _last_windows(conv_in: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` conv inputs of each packed sequence, channels first, zero-filled before its start."""
    padded = F.pad(conv_in, (0, 0, width, 0))  # (width + total, conv_dim)
    ends = cu_seqlens[1:].to(torch.long) + width
    starts = cu_seqlens[:-1].to(torch.long) + width
    idx = ends[:, None] - width + torch.arange(width, device=conv_in.device)[None, :]  # (n_seq, width)
    windows = padded[idx]  # (n_seq, width, conv_dim)
    windows = windows * (idx >= starts[:, None])[..., None].to(windows.dtype)  # nothing from the previous sequence
    return windows.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query causal attention with Granite's ``attention_multiplier`` as the scale; no positions unless
    the config asks for RoPE."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.attention_multiplier
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, rope=None, cache: HybridCache | None = None,
                layer: int = -1, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        b, l, _ = h.shape
        q = self.q_proj(h).view(b, l, self.n_heads, self.head_dim).transpose(-2, -3)  # (b, heads, l, d)
        k = self.k_proj(h).view(b, l, self.n_kv, self.head_dim).transpose(-2, -3)
        v = self.v_proj(h).view(b, l, self.n_kv, self.head_dim).transpose(-2, -3)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cu_seqlens is None:  # prefill of equal-length prompts, one per row
            cache.key[layer][:b, :, :l] = k
            cache.value[layer][:b, :, :l] = v
        elif cache is not None:  # prefill of packed prompts: scatter each sequence's keys and values into its row
            for row, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
                cache.key[layer][row, :, : e - s] = k[0, :, s:e]
                cache.value[layer][row, :, : e - s] = v[0, :, s:e]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))


def rope_frequencies(config, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (head_dim / 2,) and the factor cos/sin are scaled by (1 but for some scaled RoPE
    variants), as transformers computes them for the config."""
    scaled = getattr(config, "rope_scaling", None)  # dense Granite: its rope_parameters may scale them
    if scaled is not None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[scaled["rope_type"]](config.to_transformers(), device)
        return inv_freq.float(), float(scaling)
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)), 1.0


def rope_tables(positions: torch.Tensor, frequencies: tuple[torch.Tensor, float], dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, scaling = frequencies
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype)[..., None, :, :], sin.to(dtype)[..., None, :, :]  # broadcast over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SharedMLP(nn.Module):
    """The SwiGLU MLP every hybrid layer has beside its mixer (and its experts, if any), gate and up fused."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.input_linear = nn.Linear(config.hidden_size, 2 * config.shared_intermediate_size, bias=False)
        self.output_linear = nn.Linear(config.shared_intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(F.silu(gate) * up)


class DenseMLP(nn.Module):
    """Dense Granite's SwiGLU MLP, with transformers' ``GraniteMLP`` tensor names (``mlp.{gate,up,down}_proj``)."""

    def __init__(self, config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.gate_proj) is not nn.Linear or type(self.up_proj) is not nn.Linear:  # e.g. wrapped by LoRA
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # gate and up as one matmul (forward and backward), as the hybrid's fused input_linear does
        weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        bias = None if self.gate_proj.bias is None else torch.cat([self.gate_proj.bias, self.up_proj.bias])
        gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ExpertWeights(nn.Module):
    def __init__(self, n: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))


class Router(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.layer = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)


class MixtureOfExperts(nn.Module):
    """Top-k routing: softmax over the k chosen experts' router logits, SwiGLU experts."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.num_local_experts, c.num_experts_per_tok
        self.router = Router(c)
        self.input_linear = ExpertWeights(c.num_local_experts, 2 * c.intermediate_size, c.hidden_size)
        self.output_linear = ExpertWeights(c.num_local_experts, c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_logits = self.router.layer(tokens).float()
        top_logits, top_experts = router_logits.topk(self.top_k, dim=-1)
        top_weights = torch.softmax(top_logits, dim=-1).to(x.dtype)
        out = torch.zeros_like(tokens)
        order = torch.argsort(top_experts.reshape(-1), stable=True)
        counts = torch.bincount(top_experts.reshape(-1), minlength=self.n_experts).tolist()
        token_of = order // self.top_k
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            idx = token_of[start:start + n]
            start += n
            gate, up = F.linear(tokens[idx], self.input_linear.weight[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.output_linear.weight[e])
            out.index_add_(0, idx, y * top_weights.reshape(-1)[sel, None])
        return out.reshape(shape), router_logits


class HybridBlock(nn.Module):
    def __init__(self, config: HybridConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = config.layer_types[layer]
        self.residual_multiplier = config.residual_multiplier
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.kind == "mamba":
            self.mamba = Mamba2Mixer(config)
        else:
            self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MixtureOfExperts(config) if config.num_local_experts > 0 else None
        self.dense = config.model_type == "granite"  # dense Granite: ``mlp``, with transformers' GraniteMLP names
        if self.dense:
            self.mlp = DenseMLP(config)
        else:
            self.shared_mlp = SharedMLP(config)

    def forward(self, h, mask=None, rope=None, seq_idx=None, pad_mask=None, cache=None, cu_seqlens=None):
        x = self.input_layernorm(h)
        if self.kind == "mamba":
            x = self.mamba(x, seq_idx=seq_idx, pad_mask=pad_mask, cache=cache, layer=self.layer,
                           cu_seqlens=cu_seqlens)
        else:
            x = self.self_attn(x, mask, rope, cache=cache, layer=self.layer, cu_seqlens=cu_seqlens)
        h = h + x * self.residual_multiplier
        x = self.post_attention_layernorm(h)
        router_logits = None
        out = self.mlp(x) if self.dense else self.shared_mlp(x)
        if self.block_sparse_moe is not None:
            moe, router_logits = self.block_sparse_moe(x)
            out = moe + out
        return h + out * self.residual_multiplier, router_logits


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class HybridInner(nn.Module):
    """Embeddings, the stack of blocks, the final norm (``model.*`` in the checkpoint)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class HybridForCausalLM(nn.Module):
    """The in-tree Granite causal LM: Granite 4.0-H for a ``HybridConfig``, dense Granite for a ``DenseGraniteConfig``."""

    def __init__(self, config: HybridConfig | DenseGraniteConfig):
        super().__init__()
        self.config = config
        self.model = HybridInner(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- set-up -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, ExpertWeights, nn.Conv1d)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Mamba2Mixer):
                module.A_log.copy_(torch.log(torch.arange(1, module.n_heads + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                module.dt_bias.fill_(1.0)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)

    def gradient_checkpointing_enable(self, **_: object) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def rope(self, positions: torch.Tensor, dtype):
        """The RoPE tables the attention layers take for ``positions`` (None for a model without positions)."""
        c = self.config
        if c.position_embedding_type != "rope":
            return None
        return rope_tables(positions, rope_frequencies(c, positions.device), dtype)

    # -- full sequences -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        output_router_logits: bool | None = None,
        **_: object,
    ) -> CausalLMOutput:
        b, l = input_ids.shape
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        pad_mask = attention_mask if padded else None
        seq_idx = None
        if position_ids is not None and not padded:  # packed rows: a sequence starts wherever the position is 0
            seq_idx = seq_idx_from_position_ids(position_ids)
            if not bool((seq_idx != 0).any()):
                seq_idx = None
        if position_ids is None:
            position_ids = torch.arange(l, device=device)[None, :].expand(b, l)
        mask = causal_mask(l, device, seq_idx=seq_idx, pad_mask=pad_mask)
        h = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier
        rope = self.rope(position_ids, h.dtype)
        router_logits = []
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h, r = checkpoint(block, h, mask, rope, seq_idx, pad_mask, use_reentrant=False)
            else:
                h, r = block(h, mask, rope, seq_idx, pad_mask)
            if r is not None:
                router_logits.append(r)
        h = self.model.norm(h)
        out = CausalLMOutput(hidden_states=h)
        if return_logits:
            out.logits = self.lm_head(h) / self.config.logits_scaling
        if labels is not None:
            out.loss = self.loss_from_hidden(h, labels)
        want_router = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if router_logits and want_router:
            out.router_logits = tuple(router_logits)
            out.aux_loss = load_balancing_loss(out.router_logits, self.config.num_local_experts,
                                               self.config.num_experts_per_tok, pad_mask)
            if out.loss is not None:
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
        return out

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False):
        """Log-probabilities of ``targets`` under the (temperature-scaled) next-token distribution from ``hidden``,
        without materialising the full logits. hidden (..., H), targets (...)."""
        lead = targets.shape
        result = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                       targets.reshape(-1), temperature=temperature,
                                       logits_scaling=self.config.logits_scaling, return_entropy=return_entropy)
        if return_entropy:
            lp, ent = result
            return lp.reshape(lead), ent.reshape(lead)
        return result.reshape(lead)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over labels != -100 (labels aligned with the inputs, shifted here)."""
        targets = labels[:, 1:]
        logprobs = self.token_logprobs(hidden[:, :-1], targets)
        valid = targets != -100
        return -(logprobs * valid).sum() / valid.sum().clamp(min=1)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_pretrained(self, folder, max_shard_bytes: int = 5 * 1024**3) -> None:
        from posttrain.models.hybrid.checkpoint import save_checkpoint

        save_checkpoint(self, folder, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype: torch.dtype | None = None) -> HybridForCausalLM:
        from posttrain.models.hybrid.checkpoint import load_checkpoint

        return load_checkpoint(cls, folder, device=device, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def causal_mask(length: int, device, seq_idx: torch.Tensor | None = None,
                    pad_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean (batch, 1, L, L) mask for SDPA, or None for plain causal attention."""
    if seq_idx is None and pad_mask is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if seq_idx is not None:
        causal = causal & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    if pad_mask is not None:
        keys = pad_mask.bool()[:, None, None, :]
        eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
        causal = (causal & keys) | eye  # a padded query attends to itself only: finite, and ignored downstream
    return causal


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, top_k: int,
                        pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss: n_experts * sum_e (fraction of routed slots to e) * (mean router prob of e),
    pooled over layers, counting only unpadded tokens."""
    logits = torch.cat(router_logits, dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(1).float()  # (tokens, experts)
    weight = (torch.ones(logits.shape[0], device=logits.device) if pad_mask is None
              else pad_mask.reshape(-1).float().repeat(len(router_logits)))
    total = weight.sum()
    slots = (chosen * weight[:, None]).sum(0) / total
    mean_prob = (probs * weight[:, None]).sum(0) / total
    return n_experts * torch.sum(slots * mean_prob)
