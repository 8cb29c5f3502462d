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
    gspo     rho_i = exp((1/|y_i|) sum_t log rho_i,t), one ratio per completion, clipped per completion;
             (1/#completions) sum_i -min(rho_i A_i, clip(rho_i) A_i).

Every function takes the tokens of one micro-batch flattened (N,) with ``seq_ids`` (N,) naming the completion
(0..S-1 within the micro-batch) each token belongs to, and a ``normalizer`` counted over the whole mini-batch on
every process (``loss_normalizer``), so summing the micro-batch losses over accumulation steps and processes
gives exactly the mini-batch loss. This module must never read a config file, touch a model or an optimizer,
nor communicate across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "dr_grpo", "gspo"]
LOSS_TYPES: tuple[str, ...] = ("dapo", "grpo", "dr_grpo", "gspo")


@dataclass
class LossConfig:
    """The ``loss`` group: which objective and its constants.

    type: ``dapo`` (default), ``grpo``, ``dr_grpo`` or ``gspo`` (see the module docstring).
    epsilon_low: lower clip range, the ratio is clipped at 1 - epsilon_low (DAPO: 0.2).
    epsilon_high: upper clip range, 1 + epsilon_high (None: DAPO's clip-higher 0.28 for ``dapo``, else equal to
        epsilon_low, the symmetric clip).
    beta: weight of the k3 KL to the reference model (0: no reference model is kept or run).
    scale_rewards: divide the group-centred rewards by the group std (None: yes, except for ``dr_grpo``).
    mask_truncated: completions cut at max_new_tokens contribute no loss (DAPO's overlong filtering).
    truncated_is_cap: truncated importance sampling: weight each token by min(pi_old / pi_sampler, cap) to correct
        the mismatch between the rollout engine and the trainer (None: off; the vLLM engine turns it on for hybrids).
    """

    type: LossType = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    scale_rewards: bool | None = None
    mask_truncated: bool = False
    truncated_is_cap: float | None = None

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type must be one of {list(LOSS_TYPES)}, got {self.type!r}")
        if self.epsilon_high is None:
            self.epsilon_high = 0.28 if self.type == "dapo" else self.epsilon_low
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"loss.epsilon_low must be in [0, 1) and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0:
            raise ValueError(f"loss.beta must be >= 0, got {self.beta}")
        if self.truncated_is_cap is not None and self.truncated_is_cap <= 0:
            raise ValueError(f"loss.truncated_is_cap must be > 0, got {self.truncated_is_cap}")

    @property
    def uses_std(self) -> bool:
        return self.type != "dr_grpo" if self.scale_rewards is None else self.scale_rewards


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
    if loss_type in ("grpo", "gspo"):
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
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, low, high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weight is not None:  # truncated importance sampling: rollout engine -> trainer correction
        per_token = per_token * is_weight
    kl = None
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("loss.beta > 0 needs the reference model's log-probabilities")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3
        per_token = per_token + cfg.beta * kl

    if cfg.type in ("dapo", "dr_grpo"):  # token-level: every token of the mini-batch weighs the same
        loss = per_token.sum() / normalizer
    else:  # grpo, gspo: each completion's mean over its tokens, then the mean over completions
        loss = segment_mean(per_token, seq_ids, num_seqs).sum() / normalizer

    with torch.no_grad():
        stats = {
            "clip_low": ((ratio < low) & (advantages < 0)).sum().float(),
            "clip_high": ((ratio > high) & (advantages > 0)).sum().float(),
            "tokens": torch.tensor(float(logp.numel())),
            "kl": kl.sum().float() if kl is not None else torch.tensor(0.0),
        }
    return loss, stats
