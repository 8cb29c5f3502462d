"""What a GRPO step reports: its metrics (``step_metrics``, from the update's ``StepStats`` sums reduced over
processes and the step's completions and rewards) and its rollout records (``write_rollouts``, appended to
``rollouts.jsonl`` with ``logging.rollouts``). This module never trains and never generates.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.eval.metrics import outcome_accuracy
from posttrain.grpo.collect import Rollout

# the sums a step reduces over processes, in this order
STAT_KEYS = ("clip_low", "clip_high", "tokens", "kl", "entropy", "micro_batches", "updates", "skipped", "grad_norm",
             "loss", "mismatch_sum", "mismatch_tokens", "mismatch_kl", "reward_errors", "log_ratio_abs",
             "correction_weight", "correction_capped", "correction_masked", "correction_samples", "aux_loss",
             "aux_micro_batches")


@dataclass
class StepStats:
    """Sums over a step's micro-batches, reduced over processes before they become metrics."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, **kv: float) -> None:
        for k, v in kv.items():
            self.values[k] = self.values.get(k, 0.0) + float(v)


def step_metrics(step: int, generated: list[Rollout], counts: dict[str, float], stats: StepStats,
                 times: dict[str, float], *, accelerator, group_size: int, lr: float, kl: bool,
                 outcome: Callable[[Rollout], float | None], staleness: bool, tools: bool) -> dict[str, float]:
    """The metrics of step ``step`` (steps done) from every completion it generated, its dynamic-sampling counts,
    its update's sums (reduced here over processes) and its timings. ``kl``: the loss has a KL term;
    ``staleness``: the batch came from the asynchronous producer; ``tools``: multi-turn tool rollouts."""
    acc, G = accelerator, group_size
    local = dict(stats.values, reward_errors=times.get("reward_errors", 0.0))
    vec = torch.tensor([local.get(k, 0.0) for k in STAT_KEYS], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    s = dict(zip(STAT_KEYS, vec.tolist(), strict=True))
    tokens = max(s["tokens"], 1.0)
    m: dict[str, float] = {"step": float(step), **{k: float(v) for k, v in counts.items()}}
    for name in generated[0].rewards if generated else []:
        vals = [r.rewards[name] for r in generated if r.rewards[name] is not None]
        m[f"rewards/{name}/mean"] = sum(vals) / len(vals) if vals else math.nan
        m[f"rewards/{name}/std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    totals = [r.total for r in generated if r.total is not None]
    m["rewards/total/mean"] = sum(totals) / len(totals) if totals else math.nan
    m["accuracy"] = outcome_accuracy([outcome(r) for r in generated])
    m["rewards/unscored"] = float(sum(r.total is None for r in generated))
    m["rewards/errors"] = s["reward_errors"]
    m.update({k.removeprefix("log_metric/"): v for k, v in times.items() if k.startswith("log_metric/")})
    groups = [generated[i:i + G] for i in range(0, len(generated), G)]
    m["zero_variance_groups_frac"] = (sum(len({r.total for r in g}) <= 1 for g in groups) / len(groups)
                                      if groups else 0.0)
    lengths = [len(r.completion_ids) for r in generated]
    if lengths:
        m["completions/mean_length"] = sum(lengths) / len(lengths)
        m["completions/min_length"], m["completions/max_length"] = float(min(lengths)), float(max(lengths))
        m["completions/truncated_frac"] = sum(r.finish_reason == "length" for r in generated) / len(generated)
    m["clip/low_frac"] = s["clip_low"] / tokens
    m["clip/high_frac"] = s["clip_high"] / tokens
    m["entropy"] = s["entropy"] / tokens
    m["ratio/log_abs_mean"] = s["log_ratio_abs"] / tokens  # |log pi/pi_old|: 0 on-policy in the first pass
    if kl:
        m["kl"] = s["kl"] / tokens
    if s["mismatch_tokens"]:
        m["rollout_correction/mismatch_abs_mean"] = s["mismatch_sum"] / s["mismatch_tokens"]
        m["rollout_correction/kl"] = s["mismatch_kl"] / s["mismatch_tokens"]
    if s["correction_samples"]:
        m["rollout_correction/weight_mean"] = s["correction_weight"] / s["mismatch_tokens"]
        m["rollout_correction/capped_frac"] = s["correction_capped"] / s["mismatch_tokens"]
        m["rollout_correction/masked_frac"] = s["correction_masked"] / s["correction_samples"]
    updates = s["updates"] / acc.num_processes  # every process counts each optimizer step
    m["optim/updates"] = updates
    m["optim/skipped"] = s["skipped"] / acc.num_processes
    m["optim/grad_norm"] = s["grad_norm"] / max(s["updates"], 1)  # the same norm on every process
    m["optim/lr"] = lr
    m["loss"] = s["loss"] / max(updates, 1)  # each process holds its share of the step's loss
    m["micro_batches"] = s["micro_batches"]
    if s["aux_micro_batches"]:  # model.moe_aux_loss on a mixture of experts: the router loss, per micro-batch
        m["aux_loss"] = s["aux_loss"] / s["aux_micro_batches"]
    for phase in ("generate", "reward", "train"):
        m[f"time/{phase}_s"] = times.get(phase, 0.0)
    if staleness and generated:  # per-sample staleness, summarised
        stale = [r.staleness for r in generated]
        m["async/staleness_mean"] = sum(stale) / len(stale)
        m["async/staleness_max"] = float(max(stale))
        m["async/staleness_min"] = float(min(stale))
        m["async/policy_version"] = float(generated[0].policy_version)
    if tools and generated:
        masks = [r.completion_mask or [] for r in generated]
        m["tools/turns_mean"] = sum(1 + sum(1 for a, b in itertools.pairwise(k) if a == 0 and b == 1)
                                    for k in masks) / len(masks)
        m["tools/calls_mean"] = sum(sum(msg["role"] == "tool" for msg in (r.messages or []))
                                    for r in generated) / len(generated)
        m["tools/masked_tokens_frac"] = (sum(len(k) - sum(k) for k in masks) / max(sum(len(k) for k in masks), 1))
    return m


def check_rollouts_writable(path: Path, accelerator) -> None:
    """A ValueError naming ``logging.rollouts`` when the main process cannot append to ``path``."""
    try:
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a"):
                pass
    except OSError as e:
        raise ValueError(f"logging.rollouts: cannot write {path}: {e.strerror or e}") from None


def write_rollouts(path: Path, step: int, generated: list[Rollout], samples: list[Rollout], accelerator) -> None:
    """Append step ``step``'s completions to ``path`` (see ``LoggingConfig.rollouts``): every generated one, with the
    advantage and the old and reference log-probs of those trained on (``samples``; each process filled those of
    its own share, gathered here)."""
    acc = accelerator
    trained = {i: (s.old_logprobs, s.ref_logprobs) for i, s in enumerate(samples) if s.old_logprobs is not None}
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        trained = {i: logprobs for part in gather_object([trained]) for i, logprobs in part.items()}
    if not acc.is_main_process:
        return
    index = {id(s): i for i, s in enumerate(samples)}

    def per_token(values: list[float] | None, mask: list[int] | None, n: int) -> list[float | None] | None:
        if values is None:
            return None
        if mask is None:
            return list(values)
        it = iter(values)
        return [next(it) if m else None for m in mask] if len(mask) == n else None

    with path.open("a") as f:
        for r in generated:
            i = index.get(id(r))
            old, ref = trained.get(i, (None, None))
            n = len(r.completion_ids)
            f.write(json.dumps({
                "step": step, "prompt_index": r.prompt_index, "prompt_ids": r.prompt_ids,
                "completion_ids": r.completion_ids,
                "completion_mask": r.completion_mask if r.completion_mask is not None else [1] * n,
                "sampler_logprobs": per_token(r.sampler_logprobs, r.completion_mask, n),
                "old_logprobs": per_token(old, r.completion_mask, n),
                "ref_logprobs": per_token(ref, r.completion_mask, n),
                "rewards": r.rewards, "reward": r.total, "advantage": r.advantage if i is not None else None,
                "truncated": r.finish_reason == "length", "policy_version": r.policy_version,
            }) + "\n")
