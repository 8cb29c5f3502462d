"""The preference losses against values computed by hand, and the recipe's checks of the loss group."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError, load_config
from posttrain.dpo.config import DpoConfig, PreferenceLossSettings
from posttrain.dpo.loss import PairLogps, preference_loss

# One pair. Policy: log p(chosen) = -10 over 4 tokens, log p(rejected) = -14 over 5 tokens.
# Reference: -11 and -12. So the chosen log-ratio is +1, the rejected one -2, and h = 1 - (-2) = 3.
POLICY = PairLogps(torch.tensor([-10.0], dtype=torch.float64), torch.tensor([-14.0], dtype=torch.float64),
                   torch.tensor([4.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64))
REFERENCE = PairLogps(torch.tensor([-11.0], dtype=torch.float64), torch.tensor([-12.0], dtype=torch.float64),
                      POLICY.chosen_tokens, POLICY.rejected_tokens)


def loss_of(**settings):
    losses, chosen, rejected = preference_loss(PreferenceLossSettings(**settings), POLICY, REFERENCE)
    return losses.item(), chosen.item(), rejected.item()


def test_sigmoid_dpo_by_hand():
    # beta h = 0.1 * 3 = 0.3; -log sigmoid(0.3) = log(1 + e^-0.3) = log(1.7408182) = 0.5543552
    loss, chosen, rejected = loss_of(type="sigmoid", beta=0.1)
    assert loss == pytest.approx(0.5543552, abs=1e-6)
    assert (chosen, rejected) == pytest.approx((0.1, -0.2))  # beta times each log-ratio


def test_sigmoid_dpo_with_label_smoothing_by_hand():
    # 0.9 * log(1 + e^-0.3) + 0.1 * log(1 + e^0.3) = 0.9 * 0.5543552 + 0.1 * 0.8543552 = 0.5843552
    loss, _, _ = loss_of(type="sigmoid", beta=0.1, label_smoothing=0.1)
    assert loss == pytest.approx(0.5843552, abs=1e-6)


def test_nll_term_by_hand():
    # RPO adds nll_weight * (-log p(chosen) / tokens) = 0.5 * 10 / 4 = 1.25 to each loss; the rewards are unchanged
    plain, sigmoid = loss_of(type="sigmoid", beta=0.1), loss_of(type="sigmoid", beta=0.1, nll_weight=0.5)
    assert sigmoid[0] == pytest.approx(0.5543552 + 1.25, abs=1e-6) and sigmoid[1:] == plain[1:]
    assert loss_of(type="ipo", beta=0.1, nll_weight=0.5)[0] == pytest.approx(18.9225 + 1.25, abs=1e-9)
    losses, _, _ = preference_loss(PreferenceLossSettings(type="simpo", beta=2.0, gamma=0.5, nll_weight=0.5),
                                   POLICY, None)
    assert losses.item() == pytest.approx(0.6443967 + 1.25, abs=1e-6)
    # its gradient raises the chosen answer's log-probability even when the margin term is saturated
    chosen = torch.tensor([-10.0], requires_grad=True)
    policy = PairLogps(chosen, torch.tensor([-100.0]), torch.tensor([4.0]), torch.tensor([5.0]))
    preference_loss(PreferenceLossSettings(type="sigmoid", beta=1.0, nll_weight=1.0), policy,
                    PairLogps(torch.tensor([-10.0]), torch.tensor([-10.0]), policy.chosen_tokens,
                              policy.rejected_tokens))[0].sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.25, abs=1e-6)  # d/dc of -c/4; the saturated sigmoid adds ~0


def test_ipo_by_hand():
    # per-token log-ratios: chosen 1/4 = 0.25, rejected -2/5 = -0.4; h = 0.65; target 1/(2 beta) = 5
    # (0.65 - 5)^2 = 18.9225
    loss, chosen, rejected = loss_of(type="ipo", beta=0.1)
    assert loss == pytest.approx(18.9225, abs=1e-9)
    assert (chosen, rejected) == pytest.approx((0.025, -0.04))


def test_simpo_by_hand_ignores_the_reference():
    # averages: chosen -10/4 = -2.5, rejected -14/5 = -2.8; beta 2: 2 * 0.3 - gamma 0.5 = 0.1
    # -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443967
    losses, chosen, rejected = preference_loss(PreferenceLossSettings(type="simpo", beta=2.0, gamma=0.5), POLICY, None)
    assert losses.item() == pytest.approx(0.6443967, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-5.0, -5.6))


def test_the_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-14.0], requires_grad=True)
    policy = PairLogps(chosen, rejected, torch.tensor([4.0]), torch.tensor([5.0]))
    reference = PairLogps(torch.tensor([-11.0]), torch.tensor([-12.0]), policy.chosen_tokens, policy.rejected_tokens)
    for kind in ("sigmoid", "ipo"):
        chosen.grad = rejected.grad = None
        preference_loss(PreferenceLossSettings(type=kind), policy, reference)[0].sum().backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), kind  # descent raises chosen, lowers rejected


def test_dpo_without_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceLossSettings(type="sigmoid"), POLICY, None)


def test_recipe_errors_name_the_field(tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("model: {path: somewhere}\nloss: {type: kto, beta: 0.1}\n")
    with pytest.raises(ConfigError, match=r"dpo\.yaml: loss: loss\.type: unknown loss 'kto'; known: sigmoid, ipo, simpo"):
        load_config(DpoConfig, recipe)
    with pytest.raises(ConfigError, match=r"unknown field loss\.gama"):
        load_config(DpoConfig, recipe, ["--loss.type", "simpo", "--loss.gama", "1"])
    with pytest.raises(ConfigError, match=r"label_smoothing applies to the sigmoid loss only"):
        load_config(DpoConfig, recipe, ["--loss.type", "ipo", "--loss.label_smoothing", "0.1"])
    with pytest.raises(ConfigError, match=r"loss\.nll_weight must be >= 0, got -1"):
        load_config(DpoConfig, recipe, ["--loss.type", "sigmoid", "--loss.nll_weight", "-1"])
    with pytest.raises(ConfigError, match=r"loss\.reference must be one of"):
        load_config(DpoConfig, recipe, ["--loss.type", "ipo", "--loss.reference", "cached"])


def test_the_shipped_recipe_loads():
    from pathlib import Path

    config = load_config(DpoConfig, Path(__file__).resolve().parents[1] / "recipes" / "dpo_tiny.yaml",
                         ["--loss.type", "simpo", "--loss.beta", "2.0"])
    assert config.loss.type == "simpo" and not config.loss.needs_reference and config.data.packing


def test_posttrain_dpo_reports_bad_recipes_and_rows_with_exit_code_2(tmp_path, capsys):
    from posttrain.cli import main

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("model: {path: somewhere}\nloss: {type: kto}\n")
    assert main(["dpo", "--config", str(recipe)]) == 2
    assert "unknown loss 'kto'; known: sigmoid, ipo, simpo" in capsys.readouterr().err
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "q", "chosen": " a", "rejected": " b"}\n{"prompt": "q", "rejected": " b"}\n')
    (tmp_path / "tok").mkdir()
    from posttrain.synthetic import arithmetic_corpus
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer(arithmetic_corpus(50), vocab_size=260)
    tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tok" / "config.json").write_text('{"model_type": "granitemoehybrid"}')  # config.json only: no weights
    recipe.write_text(f"model: {{path: {tmp_path / 'tok'}}}\ndata: {{train_files: [{rows}]}}\n")
    assert main(["dpo", "--config", str(recipe)]) == 2  # the rows fail before any model is loaded
    assert f"{rows}:2: missing field `chosen`" in capsys.readouterr().err
