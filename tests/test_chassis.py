"""The training chassis and the config family: clipping against a hand computation, the non-finite guard leaves
everything as it was, the logs a start or a resume leaves, and every renamed field named by its new name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config import ConfigError, load_config
from posttrain.dpo.config import DpoConfig
from posttrain.grpo.config import GrpoConfig
from posttrain.train.chassis import Chassis
from posttrain.train.config import CheckpointSettings, LoggingSettings, OptimizerSettings, TrainConfig


def chassis(tmp_path, max_grad_norm, **optim) -> tuple[Chassis, torch.nn.Module]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    c = Chassis(OptimizerSettings(lr=0.1, max_grad_norm=max_grad_norm, schedule="constant", **optim),
                CheckpointSettings(output_dir=str(tmp_path)), LoggingSettings(progress=False),
                accelerator=Accelerator(cpu=True), logs=["rollouts.jsonl"])
    return c, c.prepare(model, total_steps=4)


def backward(model, scale: float = 1.0) -> list[torch.Tensor]:
    loss = model(torch.ones(2, 4)).pow(2).sum() * scale
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_clipping_matches_the_formula_and_null_only_measures(tmp_path):
    c, model = chassis(tmp_path / "clip", max_grad_norm=0.5)
    grads = backward(model)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm > 0.5
    before = [p.detach().clone() for p in model.parameters()]
    assert c.optimizer_step() == pytest.approx(norm, rel=1e-6)
    # AdamW's first step moves each weight by lr * sign-ish(g): recover the clipped gradient from the state instead
    exp_avg = [c.optimizer.state[p]["exp_avg"] for p in model.parameters()]
    for g, m in zip(grads, exp_avg, strict=True):
        torch.testing.assert_close(m, 0.1 * g * (0.5 / (norm + 1e-6)), rtol=1e-5, atol=1e-7)  # (1 - beta1) * clipped
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    c, model = chassis(tmp_path / "off", max_grad_norm=None)
    grads = backward(model, 10.0)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert c.optimizer_step() == pytest.approx(norm, rel=1e-6)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(c.optimizer.state[p]["exp_avg"], 0.1 * g)  # unclipped


def test_a_non_finite_step_moves_nothing(tmp_path):
    c, model = chassis(tmp_path, max_grad_norm=1.0, warmup_steps=2)
    backward(model)
    assert c.optimizer_step() is not None
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in c.optimizer.state[next(model.parameters())].items()}
    lr = c.lr
    backward(model, float("nan"))
    assert c.optimizer_step() is None
    backward(model)
    assert c.optimizer_step(loss_finite=False) is None
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    for k, v in c.optimizer.state[next(model.parameters())].items():
        assert torch.equal(v, state[k]), k
    assert c.lr == lr and all(p.grad is None for p in model.parameters())


def test_a_fresh_start_empties_the_logs_and_a_resume_cuts_them_back(tmp_path):
    c, model = chassis(tmp_path, max_grad_norm=1.0)
    old_run = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5, 6))
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        (tmp_path / name).write_text(old_run)
    assert c.resume("latest") is None  # no checkpoint: a start at step 0, and the old run's records are not this run's
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "rollouts.jsonl").read_text() == ""

    def step(i):
        backward(model)
        return {"loss": float(c.optimizer_step())}

    c.run(0, 2, step, lambda done: {"step": done})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a killed run logged past its checkpoint, cut mid-line
        f.write(json.dumps({"step": 3}) + "\n" + '{"step": 4, "lo')
    (tmp_path / "rollouts.jsonl").write_text(old_run)
    c, model = chassis(tmp_path, max_grad_norm=1.0)  # the restarted run
    assert c.resume("latest")["step"] == 2 and c.resume("latest")["step"] == 2  # restored once
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()] == [1, 2]
    assert chassis(tmp_path, max_grad_norm=1.0)[0].resume(None) is None
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "rollouts.jsonl").read_text() == ""


@pytest.mark.parametrize("cls, old, new", [
    (TrainConfig, "seed", "run.seed"), (TrainConfig, "checkpoint.resume", "run.resume"),
    (DpoConfig, "seed", "run.seed"), (DpoConfig, "checkpoint.resume", "run.resume"),
    (GrpoConfig, "run.output_dir", "checkpoint.output_dir"), (GrpoConfig, "run.save_every", "checkpoint.every_steps"),
    (GrpoConfig, "run.checkpoint_verify", "checkpoint.verify"), (GrpoConfig, "logging.log_every", "logging.every_steps"),
    (GrpoConfig, "eval.every", "eval.every_steps"),
])
def test_a_renamed_field_is_an_error_naming_its_new_name(tmp_path, cls, old, new):
    with pytest.raises(ConfigError, match=rf"{old} was renamed {new}"):
        load_config(cls, None, [f"--{old}", "1"])
    group, _, leaf = old.rpartition(".")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{group}: {{{leaf}: 1}}\n" if group else f"{leaf}: 1\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: {old} was renamed {new}"):
        load_config(cls, recipe)


def test_the_shared_groups_mean_the_same_in_every_command():
    for cls in (TrainConfig, DpoConfig, GrpoConfig):
        for value in ("0", "-1"):
            with pytest.raises(ConfigError, match=r"max_grad_norm must be > 0, or null"):
                load_config(cls, None, ["--optim.max_grad_norm", value])
        config = load_config(cls, None, ["--optim.max_grad_norm", "null", "--run.resume", "latest",
                                         "--logging.every_steps", "3", "--checkpoint.every_steps", "5"])
        assert isinstance(config.optim, OptimizerSettings) and config.optim.max_grad_norm is None
        assert (config.run.resume, config.logging.every_steps, config.checkpoint.every_steps) == ("latest", 3, 5)


def test_a_group_given_in_part_keeps_the_command_s_own_defaults(tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("optim: {max_steps: 3}\ncheckpoint: {every_steps: 7}\n")
    dpo = load_config(DpoConfig, recipe)
    assert (dpo.optim.lr, dpo.optim.per_device_batch_size, dpo.optim.max_steps) == (5e-7, 4, 3)  # DPO's, not SFT's
    assert (dpo.checkpoint.output_dir, dpo.checkpoint.every_steps) == ("runs/dpo", 7)
    grpo = load_config(GrpoConfig, None, ["--checkpoint.output_dir", "x", "--loss.type", "gspo"])
    assert (grpo.checkpoint.output_dir, grpo.checkpoint.every_steps) == ("x", 0)  # GRPO saves only at the end
    assert (grpo.loss.epsilon_low, grpo.loss.epsilon_high) == (3e-4, 4e-4)  # derived from the type given, not kept
    sft = load_config(TrainConfig, None, ["--model.path", "x"])  # path or preset: the recipe's group stands alone
    assert (sft.model.path, sft.model.preset) == ("x", None)
