"""Preference losses on sequence log-probabilities: sigmoid DPO (with label smoothing), IPO and SimPO.

Inputs are per pair: the policy's summed log-probability of the chosen and rejected completions, their token
counts, and (except for SimPO) the reference model's summed log-probabilities. With
``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

- sigmoid (DPO, Rafailov et al. 2023, eq. 7): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
  (eps = label smoothing, the conservative DPO of Mitchell 2023; eps = 0 is plain DPO);
- ipo (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2`` with h on per-token *average* log-probabilities
  (as TRL computes it, so a long pair does not dominate the regression target);
- simpo (Meng et al. 2024, eq. 6): ``-log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)``,
  reference-free, average log-probabilities.

With ``nll_weight`` = alpha > 0, every loss gains ``alpha * (-log pi(y_w) / |y_w|)``, the chosen completion's
per-token negative log-likelihood (RPO, Pang et al. 2024, eq. 3; TRL's ``rpo_alpha``, which averages over the
batch's chosen tokens where this averages per pair): DPO alone can widen the margin by lowering both answers.

The implicit rewards reported beside the loss are ``beta (log pi - log ref)`` of each completion (SimPO: ``beta``
times its average log-probability); reward accuracy is the share of pairs whose chosen reward is the larger. The
caller averages the per-pair losses however its batch needs; this module never reduces over pairs and never
touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.dpo.config import PreferenceLossSettings


@dataclass
class PairLogps:
    """Summed log-probabilities and token counts of the completions of a batch of pairs (all shape (pairs,))."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_loss(settings: PreferenceLossSettings, policy: PairLogps, reference: PairLogps | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each of shape (pairs,); the rewards carry no gradient."""
    losses, chosen_reward, rejected_reward = _margin_loss(settings, policy, reference)
    if settings.nll_weight:
        losses = losses - settings.nll_weight * policy.chosen / policy.chosen_tokens
    return losses, chosen_reward, rejected_reward


def _margin_loss(settings: PreferenceLossSettings, policy: PairLogps, reference: PairLogps | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    beta = settings.beta
    if settings.type == "simpo":
        chosen = policy.chosen / policy.chosen_tokens
        rejected = policy.rejected / policy.rejected_tokens
        losses = -F.logsigmoid(beta * (chosen - rejected) - settings.gamma)
        return losses, (beta * chosen).detach(), (beta * rejected).detach()
    if reference is None:
        raise ValueError(f"loss {settings.type!r} needs the reference model's log-probabilities")
    if settings.type == "ipo":  # per-token averages
        chosen_ratio = (policy.chosen - reference.chosen) / policy.chosen_tokens
        rejected_ratio = (policy.rejected - reference.rejected) / policy.rejected_tokens
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    elif settings.type == "sigmoid":
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        logits = beta * (chosen_ratio - rejected_ratio)
        eps = settings.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    else:
        raise ValueError(f"loss.type: unknown loss {settings.type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
