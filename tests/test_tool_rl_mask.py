"""Tool-output tokens are in the context but carry no gradient, through the trainer's own update path.

Gradients are caught at the optimizer step (``before_optimizer_step``) of ``GrpoTrainer.update`` on hand-built
multi-turn samples: prompt, model tokens, a tool answer, model tokens, and a trailing tool answer."""

from __future__ import annotations

import pytest
import torch
from posttrain.rewards import RewardsConfig, RewardSpec

from posttrain.grpo.collect import Rollout
from posttrain.grpo.config import (
    CheckpointConfig,
    GrpoConfig,
    LoggingConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    ToolsConfig,
)
from posttrain.grpo.metrics import StepStats
from posttrain.grpo.trainer import GrpoTrainer


@pytest.fixture(scope="module")
def setup():
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer([f"{a}*{b}={a * b}" for a in range(20) for b in range(20)], vocab_size=300)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), hidden_size=32, mamba_n_heads=2, mamba_d_head=32,
                                     num_hidden_layers=2, layer_types=["mamba", "attention"],
                                     shared_intermediate_size=64, eos_token_id=tok.eos_token_id))
    return tok, model


def _trainer(tok, model, tmp_path):
    config = GrpoConfig(rollout=RolloutConfig(prompts_per_step=1, num_generations=2, max_new_tokens=16),
                        rewards=RewardsConfig([RewardSpec("math")], num_workers=0),
                        optim=OptimConfig(lr=0.0, mini_batches=1, max_grad_norm=None),
                        tools=ToolsConfig(names=["calculator"]),
                        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
                        run=RunConfig(steps=1), logging=LoggingConfig(progress=False))
    rows = [{"prompt": [{"role": "user", "content": "12*34"}], "answer": "408"}]
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows)
    grads: list[dict[str, torch.Tensor]] = []
    trainer.before_optimizer_step = lambda t: grads.append(
        {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None})
    return trainer, grads


def _samples(trainer, tool_tail: list[int], train_tools: bool = False) -> list[Rollout]:
    """Two trajectories (advantages +1, -1): model 5 tokens, tool 4, model 3, tool ``tool_tail`` (trailing)."""
    prompt = trainer.collector.prompt_ids[0]
    out = []
    for k, adv in enumerate((1.0, -1.0)):
        model_a, tool_mid, model_b = [10 + k, 11, 12, 13, 14], [20, 21, 22, 23], [30 + k, 31, 32]
        completion = model_a + tool_mid + model_b + tool_tail
        mask = [1] * 5 + [0] * 4 + [1] * 3 + [0] * len(tool_tail)
        if train_tools:
            mask = [1] * len(completion)
        logprobs = [-1.0 - 0.1 * i for i in range(sum(mask))]
        out.append(Rollout(0, 0, prompt, completion, logprobs, "stop", {}, 1.0, advantage=adv,
                           completion_mask=mask, messages=[]))
    return out


def _grads(trainer, grads, samples):
    grads.clear()
    trainer.update(samples, StepStats())
    assert len(grads) == 1
    return grads[0]


def test_perturbing_tool_tokens_changes_no_gradient(setup, tmp_path):
    tok, model = setup
    trainer, grads = _trainer(tok, model, tmp_path)
    base = _grads(trainer, grads, _samples(trainer, [40, 41, 42, 43]))
    perturbed = _grads(trainer, grads, _samples(trainer, [77, 5, 99, 3]))
    assert sum(g.abs().sum() for g in base.values()) > 0
    assert base.keys() == perturbed.keys()
    for name in base:
        torch.testing.assert_close(perturbed[name], base[name], rtol=0, atol=1e-7, msg=name)
    # the same perturbation on tokens that are trained does change the gradients: the comparison can fail
    trained = _grads(trainer, grads, _samples(trainer, [40, 41, 42, 43], train_tools=True))
    trained_perturbed = _grads(trainer, grads, _samples(trainer, [77, 5, 99, 3], train_tools=True))
    assert max((trained[n] - trained_perturbed[n]).abs().max() for n in trained) > 1e-5
    trainer.close()


def test_positions_predicting_tool_tokens_get_exactly_zero_gradient(setup, tmp_path):
    tok, model = setup
    trainer, grads = _trainer(tok, model, tmp_path)
    caught = []

    def keep_grad(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda g: caught.append(g.detach().clone()))

    handle = trainer.core.model.norm.register_forward_hook(keep_grad)
    try:
        samples = _samples(trainer, [40, 41])
        _grads(trainer, grads, samples)
    finally:
        handle.remove()
    assert len(caught) == 1
    g = caught[0][0].abs().sum(-1)  # per position of the packed row
    offset = 0
    for s in samples:
        lp = len(s.prompt_ids)
        # position lp - 1 + j predicts completion token j
        for j, m in enumerate(s.completion_mask):
            value = float(g[offset + lp - 1 + j])
            if m:
                assert value > 0, f"trained token {j} got no gradient"
            else:
                assert value == 0.0, f"tool token {j} got gradient {value}"
        assert float(g[offset:offset + lp - 1].abs().sum()) == 0.0  # prompt positions predict nothing trained
        offset += lp + len(s.completion_ids) - 1
    trainer.close()
