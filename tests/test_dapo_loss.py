"""Hand-computed values for the GRPO-family losses and the group advantages (posttrain.grpo.loss)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.grpo.loss import LossConfig, group_advantages, loss_normalizer, policy_loss


def _loss(cfg, logp, old, adv, seq_ids, ref=None, max_len=4):
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor(seq_ids)
    lengths = torch.bincount(seq).tolist()
    norm = loss_normalizer(cfg.type, lengths, max_len)
    ref_t = None if ref is None else torch.tensor(ref, dtype=torch.float64)
    loss, stats = policy_loss(cfg, logp, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                              seq, len(lengths), norm, ref_logp=ref_t)
    loss.backward()
    return loss.item(), logp.grad.tolist(), stats


def test_clip_higher_keeps_gradient_between_1_2_and_1_28_under_dapo_not_grpo():
    r = math.log(1.25)  # ratio 1.25: above grpo's 1 + 0.2, below dapo's 1 + 0.28
    loss, grad, stats = _loss(LossConfig("dapo"), [r], [0.0], [1.0], [0])
    assert loss == pytest.approx(-1.25)
    assert grad == pytest.approx([-1.25])  # d(-rho A)/dlogp = -rho A
    assert stats["clip_high"].item() == 0
    loss, grad, stats = _loss(LossConfig("grpo"), [r], [0.0], [1.0], [0])
    assert loss == pytest.approx(-1.2)  # clipped at 1.2
    assert grad == pytest.approx([0.0])
    assert stats["clip_high"].item() == 1
    # above 1.28 dapo clips too
    loss, grad, stats = _loss(LossConfig("dapo"), [math.log(1.4)], [0.0], [1.0], [0])
    assert (loss, grad[0], stats["clip_high"].item()) == (pytest.approx(-1.28), 0.0, 1)


def test_negative_advantage_clips_low_only():
    # ratio 0.7 < 0.8 with A = -1: -min(-0.7, -0.8) = 0.8, clipped, no gradient, counted as low-clipped
    loss, grad, stats = _loss(LossConfig("dapo"), [math.log(0.7)], [0.0], [-1.0], [0])
    assert loss == pytest.approx(0.8) and grad == pytest.approx([0.0]) and stats["clip_low"].item() == 1
    # ratio 1.5 with A = -1: -min(-1.5, -1.28) = 1.5, not clipped: gradient 1.5
    loss, grad, stats = _loss(LossConfig("dapo"), [math.log(1.5)], [0.0], [-1.0], [0])
    assert loss == pytest.approx(1.5) and grad == pytest.approx([1.5]) and stats["clip_low"].item() == 0


def test_token_level_normalisation_dapo_vs_per_sequence_grpo():
    # completion 0: 3 tokens, A = +1; completion 1: 1 token, A = -1; ratios all 1
    logp, old, adv, seq = [0.0] * 4, [0.0] * 4, [1.0, 1.0, 1.0, -1.0], [0, 0, 0, 1]
    loss, grad, _ = _loss(LossConfig("dapo"), logp, old, adv, seq)
    assert loss == pytest.approx((-3 + 1) / 4)
    assert grad == pytest.approx([-0.25, -0.25, -0.25, 0.25])  # the long completion weighs 3/4, the short 1/4
    loss, grad, _ = _loss(LossConfig("grpo"), logp, old, adv, seq)
    assert loss == pytest.approx((-1 + 1) / 2)
    assert grad == pytest.approx([-1 / 6, -1 / 6, -1 / 6, 0.5])  # each completion weighs 1/2
    loss, grad, _ = _loss(LossConfig("dr_grpo"), logp, old, adv, seq, max_len=4)
    assert loss == pytest.approx((-3 + 1) / (2 * 4))  # constant normaliser: completions * max tokens
    assert grad == pytest.approx([-1 / 8, -1 / 8, -1 / 8, 1 / 8])


def test_gspo_sequence_level_ratio():
    # log-ratios 0.1 and 0.3: one ratio exp(0.2) = 1.2214 for the whole completion
    cfg = LossConfig("gspo", epsilon_low=0.3, epsilon_high=0.3)
    loss, grad, _ = _loss(cfg, [0.1, 0.3], [0.0, 0.0], [1.0, 1.0], [0, 0])
    rho = math.exp(0.2)
    assert loss == pytest.approx(-rho)
    assert grad == pytest.approx([-rho / 2, -rho / 2])  # d rho / d logp_t = rho / |y|
    # with eps 0.2 the completion's ratio 1.2214 is clipped as a whole; token ratios (1.105, 1.35) do not matter
    loss, grad, _ = _loss(LossConfig("gspo", epsilon_low=0.2, epsilon_high=0.2), [0.1, 0.3], [0.0, 0.0],
                          [1.0, 1.0], [0, 0])
    assert loss == pytest.approx(-1.2) and grad == pytest.approx([0.0, 0.0])


def test_grpo_k3_kl():
    logp, ref = math.log(0.8), math.log(0.5)
    delta = ref - logp
    k3 = math.exp(delta) - delta - 1  # 0.625 + 0.4700 - 1 = 0.0950
    assert k3 == pytest.approx(0.0950, abs=1e-4)
    loss, grad, stats = _loss(LossConfig("grpo", beta=0.1), [logp], [logp], [0.0], [0], ref=[ref])
    assert loss == pytest.approx(0.1 * k3)
    assert grad == pytest.approx([0.1 * (1 - math.exp(delta))])  # d k3 / d logp = 1 - exp(ref - logp)
    assert stats["kl"].item() == pytest.approx(k3)
    with pytest.raises(ValueError, match="reference"):
        _loss(LossConfig("grpo", beta=0.1), [logp], [logp], [0.0], [0])


def test_micro_batches_sum_to_the_mini_batch_loss():
    torch.manual_seed(0)
    logp = torch.randn(10, dtype=torch.float64) * 0.2
    old = torch.randn(10, dtype=torch.float64) * 0.2
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    adv_seq = torch.tensor([1.0, -0.5, 0.3, -1.2], dtype=torch.float64)
    for loss_type in ("dapo", "grpo", "dr_grpo", "gspo"):
        cfg = LossConfig(loss_type)
        norm = loss_normalizer(loss_type, torch.bincount(seq).tolist(), 5)
        full, _ = policy_loss(cfg, logp, old, adv_seq[seq], seq, 4, norm)
        first, _ = policy_loss(cfg, logp[:5], old[:5], adv_seq[seq[:5]], seq[:5], 2, norm)
        second, _ = policy_loss(cfg, logp[5:], old[5:], adv_seq[seq[5:]], seq[5:] - 2, 2, norm)
        assert (first + second).item() == pytest.approx(full.item(), rel=1e-12), loss_type


def test_group_advantages_unbiased_std_and_unscored():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # unbiased std of [1, 0, 0, 1] is sqrt(1/3)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0])
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5]
    # sample 1 was scored by no reward: excluded from the statistics, advantage 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scored=torch.tensor([1, 0, 1, 1]))
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv.tolist() == pytest.approx([(1 - mean) / (std + 1e-6), 0.0, -mean / (std + 1e-6), -mean / (std + 1e-6)])


def test_config_validation():
    assert LossConfig("grpo", epsilon_high=None).epsilon_high == 0.2
    assert LossConfig("dr_grpo").uses_std is False and LossConfig("dapo").uses_std is True
    with pytest.raises(ValueError, match="loss.type"):
        LossConfig("ppo")  # type: ignore[arg-type]
