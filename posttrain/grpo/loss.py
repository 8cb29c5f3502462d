"""The GRPO family of policy losses and group advantages, written so each line maps to its formula.

Notation (per completion i of a group, per completion token t):
    r_i          reward of completion i;  A_i = (r_i - mean_g r) / (std_g r + 1e-6)   (unbiased std; or no std)
    rho_i,t      = pi(y_t | ...) / pi_old(y_t | ...)                                  importance ratio
    L_i,t        = -min(rho_i,t * A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) * A_i)
    k3_i,t       = exp(ref - logp) - (ref - logp) - 1                                 KL(pi || ref) estimator

Loss types (a small explicit switch, see ``policy_loss``):
    dapo     sum_{i,t} L_i,t / (number of tokens in the whole mini-batch, all processes and micro-batches);
             clip-higher (eps_high > eps_low); no KL.
    grpo     (1/#completions) sum_i (1/|y_i|) sum_t (L_i,t + beta * k3_i,t); symmetric clip.
    dr_grpo  sum_{i,t} L_i,t / (#completions * max_completion_tokens): a constant normaliser; advantages
             without the std.
    gspo     s_i = exp((1/|y_i|) sum_t log rho_i,t), one ratio per completion, clipped per completion;
             (1/#completions) sum_i -min(s_i A_i, clip(s_i) A_i). The GSPO paper's clip range on this
             sequence-level ratio is 3e-4 / 4e-4 (the defaults for gspo and gspo_token).
    gspo_token  s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]: the value of s_i on every token, with each token's own
             gradient path (so per-token advantages can differ); clipped per token, aggregated as gspo.

Aggregation is a separate choice from the ratio: token-level (dapo, dr_grpo) or per-completion mean (grpo, gspo,
gspo_token), see ``AGGREGATION``. Rollout correction (``is_weight``, a per-token weight from the trainer/engine
mismatch, and masked samples) multiplies the per-token policy term before aggregation, never the KL.

Every function takes the tokens of one micro-batch flattened (N,) with ``seq_ids`` (N,) naming the completion
(0..S-1 within the micro-batch) each token belongs to, and a ``normalizer`` counted over the whole mini-batch on
every process (``loss_normalizer``), so summing the micro-batch losses over accumulation steps and processes
gives exactly the mini-batch loss. This module must never read a config file, touch a model or an optimizer,
nor communicate across processes.
"""

from __future__ import annotations

import math

import torch

from posttrain.grpo.config import LOSS_TYPES, LossConfig, LossType

__all__ = ["AGGREGATION", "LOSS_TYPES", "LossConfig", "group_advantages", "loss_normalizer", "policy_loss",
           "rollout_correction"]

# how each type turns per-token terms into the mini-batch loss: "token" (sum / normaliser) or "sequence" (each
# completion's mean over its tokens, summed, / normaliser)
AGGREGATION: dict[str, str] = {"dapo": "token", "dr_grpo": "token", "grpo": "sequence", "gspo": "sequence",
                               "gspo_token": "sequence"}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     scored: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) per group of ``group_size`` consecutive samples (unbiased std), or
    r_i - mean_g without ``scale``. Samples with ``scored`` False (no reward could score them) take no part in their
    group's statistics and get advantage 0; so does every sample of a group with fewer than two scored samples."""
    r = rewards.double().view(-1, group_size)
    m = torch.ones_like(r, dtype=torch.bool) if scored is None else scored.view(-1, group_size).bool()
    r = torch.where(m, r, 0.0)
    count = m.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(m, r - mean, 0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    adv = r - mean
    if scale:
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(m & (count >= 2), adv, 0.0)
    return adv.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def loss_normalizer(loss_type: LossType, completion_tokens: list[int], max_completion_tokens: int) -> float:
    """The denominator of the mini-batch loss, over every completion of the mini-batch on all processes:
    tokens (dapo), completions (grpo, gspo: each completion first averaged over its own tokens) or
    completions * max_completion_tokens (dr_grpo)."""
    if loss_type == "dapo":
        return float(max(sum(completion_tokens), 1))
    if loss_type in ("grpo", "gspo", "gspo_token"):
        return float(max(len(completion_tokens), 1))
    if loss_type == "dr_grpo":
        return float(max(len(completion_tokens), 1) * max_completion_tokens)
    raise ValueError(f"unknown loss type {loss_type!r}")


def segment_mean(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per completion, the mean of its tokens' values: (N,) -> (num_seqs,)."""
    sums = torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_ids, values)
    counts = torch.bincount(seq_ids, minlength=num_seqs).clamp(min=1).to(values.dtype)
    return sums / counts


def policy_loss(
    cfg: LossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    normalizer: float,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's share of the mini-batch loss, and sums for the metrics (clipped tokens, KL).

    logp, old_logp, advantages (the completion's A_i repeated on its tokens), seq_ids, ref_logp, is_weight: (N,).
    """
    log_ratio = logp - old_logp
    if cfg.type == "gspo":  # one ratio per completion: the geometric mean of its token ratios
        log_ratio = segment_mean(log_ratio, seq_ids, num_seqs)[seq_ids]
    elif cfg.type == "gspo_token":  # sg[s_i] * pi(y_t) / sg[pi(y_t)]: s_i's value, the token's own gradient
        log_ratio = segment_mean(log_ratio, seq_ids, num_seqs)[seq_ids].detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, low, high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weight is not None:  # rollout correction (truncated IS weights, masked samples): engine -> trainer
        per_token = per_token * is_weight
    kl = None
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("loss.beta > 0 needs the reference model's log-probabilities")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3
        per_token = per_token + cfg.beta * kl

    if AGGREGATION[cfg.type] == "token":  # every token of the mini-batch weighs the same
        loss = per_token.sum() / normalizer
    else:  # each completion's mean over its tokens, then the mean over completions
        loss = segment_mean(per_token, seq_ids, num_seqs).sum() / normalizer

    with torch.no_grad():
        stats = {
            "clip_low": ((ratio < low) & (advantages < 0)).sum().float(),
            "clip_high": ((ratio > high) & (advantages > 0)).sum().float(),
            "tokens": torch.tensor(float(logp.numel()), device=logp.device),
            "kl": kl.sum().float() if kl is not None else torch.zeros((), device=logp.device),
        }
    return loss, stats


def rollout_correction(log_rho: torch.Tensor, weights: str, cap: float, mask: str, threshold: float
                       ) -> tuple[torch.Tensor, bool]:
    """One completion's rollout-correction weights (T,) from log rho_t = log pi_old(y_t) - log pi_sampler(y_t), and
    whether the completion is masked (its weights are then all 0).

        weights "token":    w_t = min(rho_t, cap)                      (truncated importance sampling)
                "sequence": w_t = min(prod_t rho_t, cap) on every token
                "none":     w_t = 1
        mask "sequence":    masked if prod_t rho_t is outside [1/threshold, threshold]
             "geometric":   masked if exp(mean_t log rho_t) is outside [1/threshold, threshold]
    """
    if weights == "token":
        w = torch.exp(log_rho).clamp(max=cap)
    elif weights == "sequence":
        w = torch.exp(log_rho.sum()).clamp(max=cap).expand_as(log_rho)
    elif weights == "none":
        w = torch.ones_like(log_rho)
    else:
        raise ValueError(f"rollout_correction.weights must be token, sequence or none, got {weights!r}")
    bound = math.log(threshold)
    if mask == "sequence":
        masked = bool(log_rho.sum().abs() > bound)
    elif mask == "geometric":
        masked = bool(log_rho.mean().abs() > bound) if log_rho.numel() else False
    elif mask == "none":
        masked = False
    else:
        raise ValueError(f"rollout_correction.mask must be sequence, geometric or none, got {mask!r}")
    return (torch.zeros_like(w) if masked else w), masked
