"""GRPO on the path users run, checked against independent computations: the KL reference scored by transformers
from the untouched starting checkpoint, the update's gradient against a slow float64 oracle written the way the
papers (and TRL, verl) write the losses, no tensor created off the device it meets, overlong shaping with tools,
empty mini-batches, the engines' log-probability semantics under top_k/top_p, rollouts on disk, and resume."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward
from torch.overrides import TorchFunctionMode

from posttrain.grpo.batch import RolloutBatch
from posttrain.grpo.config import CheckpointConfig, GrpoConfig, LoggingConfig, OptimConfig, RolloutConfig, RunConfig
from posttrain.grpo.loss import LossConfig
from posttrain.grpo.trainer import GrpoTrainer
from posttrain.rollout import Capabilities, Completion, SamplingParams
from posttrain.rollout.native import NativeEngine

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(4)]


def _small_policy(seed: int = 0):
    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], vocab_size=64)
    config = preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None, hidden_size=64, mamba_n_heads=4,
                    mamba_d_head=32, mamba_d_state=16, shared_intermediate_size=128, num_hidden_layers=4,
                    layer_types=["mamba", "mamba", "attention", "mamba"], mamba_chunk_size=16)
    torch.manual_seed(seed)
    return HybridForCausalLM(config), tokenizer


def digits_reward(prompts, completions, **_):
    texts = [c if isinstance(c, str) else "".join(str(m["content"]) for m in c) for c in completions]
    return [float(sum(ch.isdigit() for ch in t)) for t in texts]


def _rewards():
    return RewardSet([WeightedReward("digits", digits_reward)])


def _config(tmp_path, loss=None, **kw):
    config = GrpoConfig(rollout=RolloutConfig(prompts_per_step=2, num_generations=4, max_new_tokens=6),
                        optim=OptimConfig(lr=5e-3, mini_batches=2, micro_batch_tokens=64),
                        rewards=RewardsConfig(num_workers=0), loss=loss or LossConfig(),
                        checkpoint=CheckpointConfig(output_dir=str(tmp_path)),
                        run=RunConfig(seed=2),
                        logging=LoggingConfig(progress=False))
    for group, values in kw.items():
        for k, v in values.items():
            setattr(getattr(config, group), k, v)
    return config


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# The KL reference: its own output layer, compared with transformers on the untouched starting checkpoint
# ---------------------------------------------------------------------------------------------------------------
def test_reference_logprobs_are_the_starting_checkpoint_scored_by_transformers(tmp_path):
    from transformers import GraniteMoeHybridForCausalLM

    model, tok = _small_policy()
    start = tmp_path / "start"
    model.save_pretrained(start)
    head_before = model.lm_head.weight.detach().clone()
    config = _config(tmp_path / "run", LossConfig("grpo", beta=0.1), rollout={"temperature": 0.8},
                     optim={"lr": 3e-2}, logging={"rollouts": True})
    config.run.steps = 3
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    trainer.train()
    assert (trainer.core.lm_head.weight - head_before).abs().max() > 1e-2  # the policy's output layer moved

    theirs = GraniteMoeHybridForCausalLM.from_pretrained(start, dtype=torch.float32).eval()
    records = [r for r in _read_jsonl(tmp_path / "run" / "rollouts.jsonl") if r["ref_logprobs"] is not None]
    assert {r["step"] for r in records} == {1, 2, 3}
    worst = moved = 0.0
    for r in records:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        with torch.no_grad():
            logits = theirs(ids).logits[0].double() / 0.8
        lp = torch.log_softmax(logits, -1)[len(r["prompt_ids"]) - 1:-1]
        expected = lp.gather(-1, torch.tensor(r["completion_ids"])[:, None])[:, 0]
        worst = max(worst, (torch.tensor(r["ref_logprobs"], dtype=torch.float64) - expected).abs().max().item())
        moved = max(moved, (torch.tensor(r["old_logprobs"], dtype=torch.float64) - expected).abs().max().item())
    assert worst < 1e-4, worst
    assert moved > 0.1  # the policy scores differently by then: the comparison above is not vacuous


def test_kl_reference_scores_with_its_own_output_layer(tmp_path):
    from transformers import GraniteMoeHybridForCausalLM

    model, tok = _small_policy()
    model.save_pretrained(tmp_path / "start")
    config = _config(tmp_path / "run", LossConfig("grpo", beta=0.1), optim={"lr": 3e-2})
    config.run.steps = 3
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    trainer.train()
    samples = trainer.last_batch
    batch = RolloutBatch.build(samples, trainer.core.device)
    ours = batch.per_sample(trainer._frozen_logprobs(batch, "ref"))
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path / "start", dtype=torch.float32).eval()
    for s, lp in zip(samples, ours, strict=True):
        with torch.no_grad():
            logits = theirs(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].double()
        expected = torch.log_softmax(logits, -1)[len(s.prompt_ids) - 1:-1].gather(
            -1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        assert (lp.double() - expected).abs().max() < 1e-4


def test_beta_with_a_missing_reference_checkpoint_is_a_clear_error(tmp_path):
    model, tok = _small_policy()
    config = _config(tmp_path, LossConfig("grpo", beta=0.1))
    config.model.ref_path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"model\.ref_path: no checkpoint"):
        GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())


def test_reference_from_ref_path_scores_with_its_own_weights(tmp_path):
    policy, tok = _small_policy(0)
    other, _ = _small_policy(1)
    other.save_pretrained(tmp_path / "ref")
    config = _config(tmp_path / "run", LossConfig("grpo", beta=0.1), logging={"rollouts": True})
    config.model.ref_path = str(tmp_path / "ref")
    config.run.steps = 1
    GrpoTrainer(config, model=policy, tokenizer=tok, rows=ROWS, reward_set=_rewards()).train()
    for r in _read_jsonl(tmp_path / "run" / "rollouts.jsonl")[:3]:
        with torch.no_grad():
            logits = other(torch.tensor([r["prompt_ids"] + r["completion_ids"]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(r["prompt_ids"]) - 1:-1]
        expected = lp.gather(-1, torch.tensor(r["completion_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r["ref_logprobs"], dtype=torch.float64), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The oracle: the update's gradient, the slow way
# ---------------------------------------------------------------------------------------------------------------
class MismatchedEngine:
    """The native engine with its log-probs perturbed, as a bfloat16 or vLLM sampler's would be."""

    name = "mismatched"
    capabilities = Capabilities(weight_sync=True, shares_module=True)  # the native engine's, less streaming

    def __init__(self, inner, scale=0.05, seed=0):
        self.inner, self.scale = inner, scale
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def sync_weights(self, model):
        return self.inner.sync_weights(model)

    def generate(self, prompts, params):
        outs = self.inner.generate(prompts, params)
        return [Completion(o.prompt_index, o.token_ids,
                           [lp + self.scale * float(torch.randn((), generator=self.gen, device="cpu"))
                            for lp in o.logprobs], o.finish_reason) for o in outs]


def _oracle_logprobs(model64, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model64(ids).logits[0] / temperature
    lp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:-1]
    return lp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def _oracle_loss(cfg: LossConfig, seqs, model64, start64, cap, max_new_tokens, temperature, counts):
    """The mini-batch loss, one sequence at a time (no padding, no packing), float64."""
    terms = []
    for s in seqs:
        logp = _oracle_logprobs(model64, s["prompt"], s["completion"], temperature)
        with torch.no_grad():
            old = _oracle_logprobs(start64, s["prompt"], s["completion"], temperature)
        ref = old  # the reference is the starting policy, which also recomputed the old log-probs
        sampler = torch.tensor(s["sampler"], dtype=torch.float64)
        w = torch.minimum(torch.exp(old - sampler), torch.tensor(cap, dtype=torch.float64))
        counts["capped"] += int((torch.exp(old - sampler) > cap).sum())
        A = s["advantage"]
        if cfg.type == "gspo":
            ratio = torch.exp((logp - old).mean()).expand_as(logp)
        elif cfg.type == "gspo_token":
            seq_ratio = torch.exp((logp - old).mean()).detach()
            ratio = seq_ratio * torch.exp(logp - logp.detach())
        else:
            ratio = torch.exp(logp - old)
        lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
        clipped_region = ((ratio < lo) & (A < 0)) | ((ratio > hi) & (A > 0))
        counts["clipped"] += int(clipped_region.sum())
        counts["unclipped"] += int((~clipped_region).sum())
        pg = -torch.minimum(ratio * A, torch.clamp(ratio, lo, hi) * A) * w
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        terms.append(pg + cfg.beta * kl)
    if cfg.type == "dapo":
        return sum(t.sum() for t in terms) / sum(t.numel() for t in terms)
    if cfg.type == "dr_grpo":
        return sum(t.sum() for t in terms) / (len(terms) * max_new_tokens)
    return sum(t.mean() for t in terms) / len(terms)  # grpo, gspo, gspo_token


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "gspo", "gspo_token"])
def test_gradient_matches_a_float64_oracle(tmp_path, loss_type):
    model, tok = _small_policy()
    start64 = copy.deepcopy(model).double().eval()
    cap, temperature, G = 1.03, 0.9, 4
    loss = LossConfig(loss_type, beta=0.05)
    config = _config(tmp_path, loss, rollout={"temperature": temperature, "max_new_tokens": 6},
                     optim={"lr": 2e-2, "mini_batches": 2, "num_iterations": 2, "micro_batch_tokens": 24,
                            "max_grad_norm": None},
                     rollout_correction={"enabled": True, "weights": "token", "cap": cap})
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    trainer.engine = MismatchedEngine(trainer.engine)
    captured = []

    def capture(t):
        captured.append(({n: p.detach().clone() for n, p in t.core.named_parameters()},
                         {n: p.grad.detach().clone() for n, p in t.core.named_parameters() if p.grad is not None}))

    trainer.before_optimizer_step = capture
    m = trainer.step()
    assert m["micro_batches"] > len(captured)  # several packed rows per mini-batch: accumulation is exercised
    batch = trainer.last_batch
    # advantages, independently: per group of G, (r - mean) / (unbiased std + 1e-6), or r - mean for dr_grpo
    seqs = []
    for g in range(0, len(batch), G):
        r = torch.tensor([x.total for x in batch[g:g + G]], dtype=torch.float64)
        adv = r - r.mean()
        if loss_type != "dr_grpo":
            adv = adv / (r.std() + 1e-6)
        seqs += [{"prompt": x.prompt_ids, "completion": x.completion_ids, "sampler": x.sampler_logprobs,
                  "advantage": float(a)} for x, a in zip(batch[g:g + G], adv, strict=True)]
    M = config.optim.mini_batches
    minis = [seqs[len(seqs) * k // M: len(seqs) * (k + 1) // M] for k in range(M)]
    assert len(captured) == M * config.optim.num_iterations
    counts = {"clipped": 0, "unclipped": 0, "capped": 0}
    model64 = copy.deepcopy(start64).train()
    worst = 0.0
    for k, (params, grads) in enumerate(captured):
        with torch.no_grad():
            for n, p in model64.named_parameters():
                p.copy_(params[n].double())
        model64.zero_grad(set_to_none=True)
        _oracle_loss(loss, minis[k % M], model64, start64, cap, 6, temperature, counts).backward()
        ref = torch.cat([p.grad.reshape(-1) for n, p in model64.named_parameters() if n in grads])
        ours = torch.cat([grads[n].double().reshape(-1) for n, p in model64.named_parameters() if n in grads])
        assert set(grads) == {n for n, p in model64.named_parameters() if p.grad is not None}
        worst = max(worst, ((ours - ref).norm() / ref.norm()).item())
    assert worst <= 1e-5, worst
    # not vacuous: the clip and the truncation of the IS weights both acted, and both did not
    assert counts["clipped"] > 0 and counts["unclipped"] > 0, counts
    assert counts["capped"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Device discipline
# ---------------------------------------------------------------------------------------------------------------
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.logspace, torch.eye,
             torch.empty_strided, torch.tril_indices, torch.triu_indices}
ROOTS = tuple(str(Path(__import__(m, fromlist=["x"]).__file__).parent) + os.sep
              for m in ("posttrain", "posttrain.rewards", "posttrain.kernels"))


class NoImplicitDevice(TorchFunctionMode):
    """Fails a tensor factory called without ``device=`` from the project's own code."""

    def __init__(self):
        super().__init__()
        self.offences: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            import sys

            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if where.startswith(ROOTS):
                self.offences.append(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def _discipline_step(tmp_path, dtype):
    model, tok = _small_policy()
    model = model.to(dtype)
    # bfloat16 turns the rollout correction on by itself; float32 recomputes the old log-probs when asked
    config = _config(tmp_path, LossConfig("dapo", beta=0.05), rollout={"recompute_old_logprobs": True},
                     model={"dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"})
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    mode = NoImplicitDevice()
    with mode:
        m = trainer.step()
    return m, mode.offences


def test_no_tensor_is_created_without_a_device_in_a_step(tmp_path):
    m, offences = _discipline_step(tmp_path, torch.float32)
    assert offences == [], "\n".join(sorted(set(offences)))
    assert m["optim/updates"] == 2 and math.isfinite(m["kl"])


def test_bfloat16_step_with_recomputed_old_logprobs_correction_and_kl(tmp_path, fresh_precision):
    m, offences = _discipline_step(tmp_path, torch.bfloat16)
    assert offences == [], "\n".join(sorted(set(offences)))
    assert m["optim/updates"] == 2 and m["optim/skipped"] == 0
    assert math.isfinite(m["loss"]) and m["kl"] >= 0
    assert m["rollout_correction/mismatch_abs_mean"] > 0  # bfloat16 sampler vs bfloat16 trainer rows differ
    assert 0 < m["rollout_correction/weight_mean"] <= 2


def test_bfloat16_turns_the_correction_on_by_default(tmp_path, fresh_precision):
    model, tok = _small_policy()
    autocast = GrpoTrainer(_config(tmp_path / "a", model={"dtype": "bfloat16"}), model=model, tokenizer=tok,
                           rows=ROWS, reward_set=_rewards())
    assert autocast.correction is not None and autocast.core.dtype == torch.float32  # bf16 is the autocast's
    fresh_precision()
    given = GrpoTrainer(_config(tmp_path / "g"), model=_small_policy()[0].to(torch.bfloat16), tokenizer=tok,
                        rows=ROWS, reward_set=_rewards())
    assert given.correction is not None  # a bfloat16 model given directly samples in bfloat16
    fresh_precision()
    fp32 = GrpoTrainer(_config(tmp_path / "b"), model=_small_policy()[0], tokenizer=tok, rows=ROWS,
                       reward_set=_rewards())
    assert fp32.correction is None


# ---------------------------------------------------------------------------------------------------------------
# Overlong shaping with tools, empty mini-batches, GSPO's clip range
# ---------------------------------------------------------------------------------------------------------------
def test_overlong_shaping_with_tools_uses_the_trajectory_limit(tmp_path):
    from posttrain.grpo.tools import ToolEnvironment, calculator_tool

    model, tok = _small_policy()
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}="}], "answer": str(a * b)}
            for a in range(3) for b in range(3)]
    config = _config(tmp_path, rollout={"max_new_tokens": 8}, tools={"names": ["calculator"], "max_tokens": 64,
                                                                     "max_turns": 2},
                     overlong={"buffer": 4}, dynamic_sampling={"enabled": False})
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows, reward_set=_rewards(),
                          env=ToolEnvironment([calculator_tool()]))
    trainer.update = lambda samples, stats: None
    trainer.step()
    lengths = [len(r.completion_ids) for r in trainer.last_batch]
    assert max(lengths) >= 8  # turns ran to their own limit: the old L_max
    for r in trainer.last_batch:  # DAPO's soft punishment with L_max = 64, L_cache = 4
        n = len(r.completion_ids)
        expected = 0.0 if n <= 60 else max(-1.0, (60 - n) / 4)
        assert r.rewards["overlong"] == pytest.approx(expected)


def test_an_empty_mini_batch_takes_no_optimizer_step(tmp_path):
    model, tok = _small_policy()
    trainer = GrpoTrainer(_config(tmp_path, optim={"mini_batches": 2}), model=model, tokenizer=tok, rows=ROWS,
                          reward_set=_rewards())
    trainer.update = lambda samples, stats: None
    trainer.step()
    sample = next(r for r in trainer.last_batch if r.advantage != 0)
    del trainer.update
    from posttrain.grpo.metrics import StepStats

    trainer.update([sample], StepStats())  # one sample, two mini-batches: the second is empty
    steps = {int(s["step"]) for s in trainer.chassis.optimizer.state.values()}
    assert steps == {1}  # AdamW stepped once; an empty mini-batch would have moved the weights on momentum alone


def test_gspo_clip_range_is_the_papers_and_gspo_token_exists():
    cfg = LossConfig("gspo")
    assert (cfg.epsilon_low, cfg.epsilon_high) == (3e-4, 4e-4)
    cfg = LossConfig("gspo_token")
    assert (cfg.epsilon_low, cfg.epsilon_high) == (3e-4, 4e-4)
    assert (LossConfig("grpo").epsilon_low, LossConfig("grpo").epsilon_high) == (0.2, 0.2)
    assert LossConfig("dapo").epsilon_high == 0.28


# ---------------------------------------------------------------------------------------------------------------
# Log-probability semantics under truncated sampling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (8, 0.9)])
def test_native_engine_logprobs_are_of_the_truncated_renormalised_distribution(top_k, top_p):
    model, tok = _small_policy()
    prompt = list(tok.encode("3+4=", add_special_tokens=False))
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p, n=4, seed=3)
    outs = NativeEngine(model).generate([prompt], params)
    for o in outs:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + o.token_ids])).logits[0].double() / 0.7
        for t, (tokid, got) in enumerate(zip(o.token_ids, o.logprobs, strict=True)):
            p = torch.softmax(logits[len(prompt) - 1 + t], -1)
            order = torch.argsort(p, descending=True)
            keep = torch.zeros_like(p, dtype=torch.bool)
            mass = 0.0
            for rank, v in enumerate(order.tolist()):  # the top-k, then the smallest prefix reaching top_p
                if (top_k and rank >= top_k) or mass >= top_p:
                    break
                keep[v] = True
                mass += p[v].item()
            assert keep[tokid]
            expected = math.log(p[tokid].item() / p[keep].sum().item())
            assert got == pytest.approx(expected, abs=1e-4)


def test_truncated_sampling_trains_on_the_untruncated_policy_and_corrects(tmp_path):
    model, tok = _small_policy()
    config = _config(tmp_path, rollout={"top_k": 4}, logging={"rollouts": True}, optim={"mini_batches": 1})
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    assert trainer.correction is not None  # auto: on for truncated sampling
    start = copy.deepcopy(model).eval()
    m = trainer.step()
    assert m["rollout_correction/weight_mean"] < 1  # pi_old / pi_sampler = the kept mass, below 1
    for r in _read_jsonl(tmp_path / "rollouts.jsonl"):
        if r["old_logprobs"] is None:
            continue
        with torch.no_grad():
            logits = start(torch.tensor([r["prompt_ids"] + r["completion_ids"]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(r["prompt_ids"]) - 1:-1]
        untruncated = lp.gather(-1, torch.tensor(r["completion_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r["old_logprobs"], dtype=torch.float64), untruncated, atol=1e-4)
        assert all(s >= o - 1e-4 for s, o in zip(r["sampler_logprobs"], r["old_logprobs"], strict=True))
    with pytest.raises(ValueError, match="recompute_old_logprobs"):
        _config(tmp_path, rollout={"top_p": 0.9, "recompute_old_logprobs": False}).__post_init__()


# ---------------------------------------------------------------------------------------------------------------
# Rollouts on disk, bad input, resume
# ---------------------------------------------------------------------------------------------------------------
def test_rollouts_jsonl_holds_every_completion_with_its_fields(tmp_path):
    model, tok = _small_policy()
    config = _config(tmp_path, LossConfig("grpo", beta=0.1), logging={"rollouts": True},
                     rollout={"recompute_old_logprobs": True})
    config.run.steps = 2
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    history = trainer.train()
    records = _read_jsonl(tmp_path / "rollouts.jsonl")
    generated = sum(h["dynamic_sampling/generated_groups"] for h in history) * 4
    assert len(records) == generated
    fields = {"step", "prompt_index", "prompt_ids", "completion_ids", "completion_mask", "sampler_logprobs",
              "old_logprobs", "ref_logprobs", "rewards", "reward", "advantage", "truncated", "policy_version"}
    for r in records:
        assert set(r) == fields
        n = len(r["completion_ids"])
        assert r["completion_mask"] == [1] * n and len(r["sampler_logprobs"]) == n
        assert r["rewards"]["digits"] == r["reward"] == digits_reward(None, [tok.decode(
            [t for t in r["completion_ids"] if t != tok.eos_token_id])])[0]
        assert r["policy_version"] == r["step"] - 1
        if r["advantage"] is not None:
            assert len(r["old_logprobs"]) == n and len(r["ref_logprobs"]) == n
    for step in (1, 2):  # advantages centred per kept group
        kept = [r for r in records if r["step"] == step and r["advantage"] is not None]
        assert sum(r["advantage"] for r in kept) == pytest.approx(0.0, abs=1e-6)


def test_tool_answers_are_null_in_the_logged_logprobs(tmp_path):
    from posttrain.grpo.tools import ToolEnvironment, calculator_tool

    class CallingEngine:
        """Always calls the calculator on its first turn, then answers."""

        name = "calling"
        capabilities = Capabilities(shares_module=True)  # stands in for the native engine: no recomputed old policy

        def __init__(self):
            self.turn = 0

        def generate(self, prompts, params):
            call = tok.encode('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>',
                              add_special_tokens=False)
            out = []
            for i, _ in enumerate(prompts):
                for _ in range(params.n):
                    ids = list(call if self.turn == 0 else tok.encode("6", add_special_tokens=False))
                    ids.append(tok.eos_token_id)
                    out.append(Completion(i, ids, [-0.5] * len(ids), "stop"))
            self.turn += 1
            return out

    model, tok = _small_policy()
    rows = [{"prompt": [{"role": "user", "content": "2*3="}], "answer": "6"}] * 4
    config = _config(tmp_path, tools={"names": ["calculator"], "max_tokens": 512}, logging={"rollouts": True},
                     dynamic_sampling={"enabled": False}, rollout={"max_new_tokens": 200},
                     data={"max_prompt_tokens": 4096})
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows, reward_set=_rewards(),
                          env=ToolEnvironment([calculator_tool()]))
    trainer.engine = CallingEngine()
    trainer.step()
    records = _read_jsonl(tmp_path / "rollouts.jsonl")
    assert records and all(0 in r["completion_mask"] for r in records)
    for r in records:
        for m, s, o in zip(r["completion_mask"], r["sampler_logprobs"], r["old_logprobs"] or r["sampler_logprobs"],
                           strict=True):
            assert (m == 0) == (s is None) == (o is None)


def test_rollouts_to_an_unwritable_folder_and_bad_correction_settings_are_clear_errors(tmp_path):
    model, tok = _small_policy()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = _config(blocker / "run", logging={"rollouts": True})
    with pytest.raises(ValueError, match=r"logging\.rollouts: cannot write"):
        GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    for field, value in (("cap", 0.0), ("mask_threshold", 1.0)):
        config = _config(tmp_path)
        setattr(config.rollout_correction, field, value)
        with pytest.raises(ValueError, match=rf"rollout_correction\.{field}"):
            config.__post_init__()


def _run(folder, config_kw=None, **run):
    model, tok = _small_policy()
    config = _config(folder, **(config_kw or {}))
    for k, v in run.items():
        setattr(config.run, k, v)
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=ROWS, reward_set=_rewards())
    trainer.train()
    return trainer


def test_resume_logs_each_step_once(tmp_path):
    import shutil

    _run(tmp_path / "a", steps=3)
    _run(tmp_path / "b", {"checkpoint": {"every_steps": 2}}, steps=3)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000003")  # killed after step 3's logs, before its save
    _run(tmp_path / "b", {"checkpoint": {"every_steps": 2}}, steps=3, resume="latest")
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [m["step"] for m in a] == [1.0, 2.0, 3.0]
    assert [m["rewards/digits/mean"] for m in a] == [m["rewards/digits/mean"] for m in b]


def test_resumed_rollouts_append_without_repeating_and_changed_correction_is_said(tmp_path, caplog):
    import shutil

    logged = {"logging": {"rollouts": True}}
    _run(tmp_path / "a", logged, steps=3)
    _run(tmp_path / "b", {**logged, "checkpoint": {"every_steps": 2}}, steps=3)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000003")
    with caplog.at_level(logging.WARNING):
        resumed = GrpoTrainer(_config(tmp_path / "b", logging={"rollouts": True}, rollout_correction={"enabled": True},
                                      run={"resume": "latest", "steps": 3}),
                              model=_small_policy()[0], tokenizer=_small_policy()[1], rows=ROWS, reward_set=_rewards())
    assert "different rollout_correction settings" in caplog.text
    resumed.correction = None  # back to the original settings, to compare with the straight run
    resumed.train()
    ra, rb = _read_jsonl(tmp_path / "a" / "rollouts.jsonl"), _read_jsonl(tmp_path / "b" / "rollouts.jsonl")
    assert [(r["step"], r["completion_ids"]) for r in ra] == [(r["step"], r["completion_ids"]) for r in rb]
    assert sorted({r["step"] for r in rb}) == [1, 2, 3]


def test_a_fresh_start_with_resume_latest_drops_the_logs_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0.0}) + "\n" + json.dumps({"step": 1.0}) + "\n")
    _run(tmp_path, steps=2, resume="latest")
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1.0, 2.0]
