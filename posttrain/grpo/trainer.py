"""The GRPO loop on the training chassis (``posttrain.train.chassis``: accelerator, optimizer, schedule, clipping,
the non-finite guard, checkpoints, metrics, the loop): ``GrpoTrainer.step`` collects G completions per prompt
(``collect``, or the asynchronous producer), computes group advantages, and takes one optimizer step per mini-batch
for ``optim.num_iterations`` passes, each mini-batch split across processes and packed into padding-free rows
(``batch``), log-probabilities from the fused kernel (``policy``). This module must never write outside
``checkpoint.output_dir`` nor change the rewards' values.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from posttrain.config import config_to_dict
from posttrain.eval.metrics import outcome_accuracy
from posttrain.families import check_packed_rows, core_model, is_in_tree, router_loss_on
from posttrain.grpo.batch import MicroBatch, RolloutBatch
from posttrain.grpo.collect import Rollout, RolloutCollector
from posttrain.grpo.config import GrpoConfig
from posttrain.grpo.data import pack_micro_batches
from posttrain.grpo.loss import group_advantages, loss_normalizer, policy_loss, rollout_correction
from posttrain.grpo.metrics import StepStats, check_rollouts_writable, step_metrics, write_rollouts
from posttrain.grpo.policy import final_hidden, head_logprobs, load_policy, reference_model
from posttrain.provenance import checkpoint_provenance, data_provenance
from posttrain.rewards import RewardSet
from posttrain.rollout.async_rollout import AsyncRollouts
from posttrain.train.chassis import Chassis
from posttrain.train.loop import TrainResult
from posttrain.train.run import apply_lora, save_final

logger = logging.getLogger(__name__)


def shard(items: list, parts: int, index: int) -> list:
    """The ``index``-th of ``parts`` contiguous, nearly equal slices of ``items``."""
    n = len(items)
    return items[n * index // parts:n * (index + 1) // parts]


def progress_figures(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step."""
    return {"reward": f"{metrics.get('rewards/total/mean', math.nan):.3f}",
            "acc": f"{metrics.get('accuracy', math.nan):.3f}", "clip_hi": f"{metrics.get('clip/high_frac', 0):.3f}"}


class GrpoTrainer:
    """GRPO/DAPO training of a causal LM (its class: ``posttrain.grpo.policy.load_policy``). Everything the config
    names can be given directly instead (``model``, ``tokenizer``, ``rows``, ``eval_rows``, ``reward_set``: used
    with the pool of ``rewards``) for tests and notebooks."""

    def __init__(self, config: GrpoConfig, model=None, tokenizer=None, rows: list[dict] | None = None,
                 eval_rows: list[dict] | None = None, reward_set: RewardSet | None = None, accelerator=None,
                 env=None, recipe: str | None = None):
        from posttrain.rollout.registry import choose_engine
        from posttrain.tokenizer import load_tokenizer

        self.config = c = config
        self.recipe = recipe  # the recipe file, named in the final training manifest
        # model.dtype as in every command: bf16 autocast over float32 master weights (or plain float32)
        self.chassis = Chassis(c.optim, c.checkpoint, c.logging, dtype=c.model.dtype, accelerator=accelerator,
                               stage="grpo", logs=["rollouts.jsonl"])
        self.accelerator = acc = self.chassis.accelerator
        self.output_dir = self.chassis.output_dir
        if c.rollout.prompts_per_step % acc.num_processes:
            raise ValueError(f"rollout.prompts_per_step={c.rollout.prompts_per_step} must be a multiple of the "
                             f"number of processes ({acc.num_processes})")
        if c.async_rollout.enabled and acc.num_processes > 1:  # its gathers would interleave with the all-reduces
            raise ValueError("async_rollout.enabled supports one training process for now")
        torch.manual_seed(c.run.seed)
        # the engine, checked against the model's family and what this run needs, before anything loads or is written
        family = getattr(getattr(model, "config", None), "model_type", None)
        self.engine_needs = {"weight_sync"} | ({"shares_module"} if c.async_rollout.enabled else set())
        if model is None and not c.model.path:
            raise ValueError("model.path: no checkpoint given")
        self.engine_spec = choose_engine(c.rollout.engine, None if model is not None else c.model.path,
                                         family=family, field="rollout.engine", needs=self.engine_needs)
        self.base: dict[str, Any] = {"model": type(model).__name__, "given": True} if model is not None else {}
        if model is None:
            model = load_policy(c.model.path, "float32", "model.path", self.engine_spec.module_class)
            self.base = checkpoint_provenance(c.model.path)
        if not is_in_tree(model):  # the update packs samples into padding-free rows: they must stay apart
            check_packed_rows(model, "model.path")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(c.model.tokenizer or c.model.path)
        self.collector = RolloutCollector(c, self.tokenizer, reward_set=reward_set, rows=rows, eval_rows=eval_rows,
                                          env=env, process_index=acc.process_index, num_processes=acc.num_processes)
        if c.logging.rollouts:  # before any work: a run that cannot keep its rollouts stops here
            check_rollouts_writable(self.output_dir / "rollouts.jsonl", acc)
        if c.lora.enabled:  # seeded by run.seed above: the adapters' initialisation is a function of the recipe
            model = apply_lora(model, c.lora, fused_head=True)
        if c.model.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        model.train()
        self.ref_model = reference_model(c, model)
        # the schedule runs over optimizer steps: mini-batches x passes per generation step
        total_updates = max(1, c.run.steps * c.optim.mini_batches * c.optim.num_iterations)
        # async: a producer thread generates the next batches on its own copy of the policy; checkpoints keep the
        # batches it generated ahead (a resumed run trains on them, as the uninterrupted one did)
        self.async_rollouts = AsyncRollouts(lambda index: self.collector.collect(self.engine, index),
                                            lambda state: self.rollout_model.load_state_dict(state),
                                            c.async_rollout.max_staleness) if c.async_rollout.enabled else None
        self.model = self.chassis.prepare(model, total_updates, self.collector.sampler,
                                          *[self.async_rollouts] if self.async_rollouts is not None else [])
        if self.ref_model is not None:  # never prepared (no gradients), so moved to the policy's device here
            self.ref_model.to(acc.device)
        # bfloat16 compute: the run's autocast, or a bfloat16 model given directly
        self.bf16 = self.core.dtype == torch.bfloat16 or acc.mixed_precision == "bf16"
        self.moe_aux = router_loss_on(model, c.model.moe_aux_loss)
        # async: the producer's own copy of the policy
        self.rollout_model = copy.deepcopy(self.core).eval().requires_grad_(False) if c.async_rollout.enabled else None
        self.engine = self._build_engine()
        corrects = c.rollout_correction_on(self.engine.capabilities.shares_module, self.bf16)
        self.correction = c.rollout_correction if corrects else None
        self.step_count = self.skipped_updates = 0
        self.history: list[dict[str, float]] = []
        self.last_batch: list[Rollout] = []  # the last step's groups after dynamic sampling, with advantages
        self.before_optimizer_step: Callable[[GrpoTrainer], None] | None = None
        self._resume()

    @property
    def core(self):
        """The bare policy: no DDP wrapper, no peft wrapper (LoRA's layers, adapters applied, are inside it)."""
        return core_model(self.model)

    def _build_engine(self, model=None):
        """The configured engine on ``model`` (default: the policy, or async's copy), from the trainer's weights."""
        model = model if model is not None else self.rollout_model if self.rollout_model is not None else self.core
        engine = self.collector.build_engine(self.engine_spec.name, model, self.core.config.model_type,
                                             self.engine_needs, self.bf16, self.accelerator.num_processes)
        engine.sync_weights(self.core)  # the engine starts from the trainer's weights (a no-op on the same module)
        return engine

    def close(self) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        self.collector.close()
        if self.engine.capabilities.close:  # vLLM: its temporary weights folder; a server: the sync group
            self.engine.close()

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One GRPO step (see the module docstring); returns its metrics."""
        c = self.config
        # 1. collect the step's groups (async: generated ahead by the producer, on an older policy)
        if self.async_rollouts is not None:
            version, collected = self.async_rollouts.next_batch(self.step_count)
        else:
            version, collected = self.step_count, self.collector.collect(self.engine, self.step_count)
        for r in collected.generated:
            r.policy_version, r.staleness = version, self.step_count - version
        times = dict(collected.times)
        samples = [r for g in collected.groups for r in g]
        # 2. advantages, per group, on the CPU: a few numbers per group
        if samples:
            rewards = torch.tensor([r.total if r.total is not None else 0.0 for r in samples], dtype=torch.float64,
                                   device="cpu")
            scored = torch.tensor([r.total is not None for r in samples], device="cpu")
            adv = group_advantages(rewards, c.rollout.num_generations, scale=c.loss.uses_std, scored=scored)
            for r, a in zip(samples, adv.tolist(), strict=True):
                r.advantage = a
        self.last_batch = samples
        # 3. the update
        train_samples = [r for r in samples if not (c.loss.mask_truncated and r.finish_reason == "length")]
        if self.engine.capabilities.sleep and c.rollout.vllm_sleep:
            self.engine.sleep()  # give the GPU memory of the engine's caches (vLLM's) to training
        stats = StepStats()
        t0 = time.perf_counter()
        if train_samples:
            self.update(train_samples, stats)
        times["train"] = time.perf_counter() - t0
        if self.engine.capabilities.weight_sync and self.async_rollouts is None:  # async: the producer loads them
            self.engine.sync_weights(self.core)  # a no-op for an engine decoding the policy itself
        self.step_count += 1
        if self.async_rollouts is not None:
            self.async_rollouts.publish(self.step_count, self.core.state_dict())
        # 4. metrics
        metrics = step_metrics(self.step_count, collected.generated, collected.counts, stats, times,
                               accelerator=self.accelerator, group_size=c.rollout.num_generations,
                               lr=self.chassis.lr, kl=c.loss.beta > 0, outcome=self.collector.outcome,
                               staleness=self.async_rollouts is not None, tools=self.collector.env is not None)
        if c.logging.record_samples:  # the prompts this step generated from, one per group (audits)
            metrics["samples"] = sorted(r.prompt_index for r in collected.generated[::c.rollout.num_generations])
        self.history.append(metrics)
        if c.logging.rollouts:
            write_rollouts(self.output_dir / "rollouts.jsonl", self.step_count, collected.generated, samples,
                           self.accelerator)
        return metrics

    # -- the update ---------------------------------------------------------------------------------------------
    def update(self, samples: list[Rollout], stats: StepStats) -> None:
        """``optim.num_iterations`` passes over ``samples``, one optimizer step per mini-batch; the ratio's old
        log-probs and the reference's first, without gradients."""
        c, acc = self.config, self.accelerator
        minis = [shard(samples, c.optim.mini_batches, m) for m in range(c.optim.mini_batches)]
        local = [shard(mini, acc.num_processes, acc.process_index) for mini in minis]
        batch = RolloutBatch.build([s for part in local for s in part], self.core.device)
        off_policy = self.async_rollouts is not None
        need_old = (c.optim.mini_batches * c.optim.num_iterations > 1 or self.correction is not None or off_policy
                    or c.rollout.truncated_distribution)
        recompute = c.rollout.recompute_old_logprobs
        if recompute is None:
            # an engine decoding the trainer's own module in float32 sampled with the trainer's log-probs
            recompute = not (self.engine.capabilities.shares_module and not self.bf16)
        # truncated sampling, or another engine: the ratio's old policy is the trainer's own (the sampler's log-probs
        # serve the correction only); off-policy: the generating policy's, whose log-probs only the sampler has
        recompute = not off_policy and (recompute or c.rollout.truncated_distribution or self.correction is not None)
        self.model.eval()  # no dropout in the hybrid; eval only marks the no-grad pass
        old = ref = weights = None
        if need_old and batch.samples:
            old = self._frozen_logprobs(batch, "old") if recompute else batch.sampler_logprobs
        if c.loss.beta > 0 and batch.samples:
            ref = self._frozen_logprobs(batch, "ref")
        self.model.train()
        if old is not None and recompute:
            weights = self._rollout_correction(batch, old, stats)
        if c.logging.rollouts:
            olds = batch.per_sample(old) if old is not None else [None] * len(batch.samples)
            refs = batch.per_sample(ref) if ref is not None else [None] * len(batch.samples)
            for s, o, r in zip(batch.samples, olds, refs, strict=True):
                s.old_logprobs = o.tolist() if o is not None else None
                s.ref_logprobs = r.tolist() if r is not None else None
        for _ in range(c.optim.num_iterations):
            start = 0
            for mini, mine in zip(minis, local, strict=True):
                rows, start = list(range(start, start + len(mine))), start + len(mine)
                if not mini:  # fewer samples than mini-batches: no optimizer step on an empty one (Adam's momentum
                    continue  # alone would move the weights)
                norm = loss_normalizer(c.loss.type, [s.num_trained for s in mini], self.collector.max_completion_tokens)
                self._train_mini_batch(batch, rows, norm, old, ref, weights, stats)

    def _logprobs(self, model, micro: MicroBatch, train: bool = False):
        """Per-token log-probs of a micro-batch's targets from its packed row, through ``model`` end to end (the
        policy, or the reference model with its own output layer), under the run's autocast; ``train``: (log-probs,
        entropies, the router loss or None: ``model.moe_aux_loss`` on a mixture of experts)."""
        with self.accelerator.autocast():
            hidden, aux = final_hidden(model, micro.ids, micro.positions, router_aux=train and self.moe_aux)
            out = head_logprobs(self.core if model is self.model else model, hidden[0, micro.target_pos],
                                micro.targets, self.config.rollout.temperature, train)
        return (*out, aux) if train else out

    @torch.no_grad()
    def _frozen_logprobs(self, batch: RolloutBatch, which: str) -> torch.Tensor:
        """Per-target log-probs (float32, in the batch's target order) under the current policy (``old``) or the
        reference model (``ref``), no grad."""
        out = torch.empty(batch.targets.shape, dtype=torch.float32, device=batch.device)
        adapters_off = which == "ref" and self.ref_model is None  # LoRA: the reference is the policy, adapters off
        model = self.ref_model if which == "ref" and not adapters_off else self.model
        with self.accelerator.unwrap_model(self.model).disable_adapter() if adapters_off else contextlib.nullcontext():
            for idxs in pack_micro_batches(batch.row_lengths, self.config.optim.micro_batch_tokens):
                micro = batch.micro(idxs)
                out[micro.target_index] = self._logprobs(model, micro).float()
        return out

    def _rollout_correction(self, batch: RolloutBatch, old: torch.Tensor, stats: StepStats) -> torch.Tensor | None:
        """The mismatch between the sampler's and the trainer's log-probs, logged per sample; the rollout correction
        weights per target (None: correction off)."""
        rc = self.correction
        weights = []
        for lp, slp in zip(batch.per_sample(old), batch.per_sample(batch.sampler_logprobs), strict=True):
            log_rho = lp.double() - slp.double()
            stats.add(mismatch_sum=log_rho.abs().sum().item(), mismatch_tokens=log_rho.numel(),
                      mismatch_kl=(torch.exp(log_rho) - log_rho - 1).sum().item())
            if rc is not None:
                w, masked = rollout_correction(log_rho, rc.weights, rc.cap, rc.mask, rc.mask_threshold)
                weights.append(w.float())
                stats.add(correction_weight=w.sum().item(), correction_capped=(w >= rc.cap).sum().item() * (not masked),
                          correction_masked=float(masked), correction_samples=1)
        return torch.cat(weights) if rc is not None else None

    def _train_mini_batch(self, batch: RolloutBatch, mine: list[int], norm: float, old: torch.Tensor | None,
                          ref: torch.Tensor | None, weights: torch.Tensor | None, stats: StepStats) -> None:
        """One optimizer step on this process's share ``mine`` (indices into ``batch``) of a mini-batch, accumulated
        over its packed rows; the loss is DAPO's (or the configured type's) over the whole mini-batch."""
        c, acc = self.config, self.accelerator
        rows = pack_micro_batches([batch.row_lengths[i] for i in mine], c.optim.micro_batch_tokens) or [[]]
        finite, loss_total = True, 0.0
        for j, idxs in enumerate(rows):
            with contextlib.nullcontext() if j == len(rows) - 1 else acc.no_sync(self.model):
                if not idxs:  # nothing here for this process: a zero loss keeps the gradient all-reduce in step
                    ids = torch.zeros(1, 1, dtype=torch.long, device=self.core.device)
                    acc.backward(final_hidden(self.model, ids, torch.zeros_like(ids))[0].sum() * 0.0)
                    continue
                micro = batch.micro([mine[i] for i in idxs])
                logp, entropy, aux = self._logprobs(self.model, micro, train=True)
                adv = batch.advantages[micro.samples].to(logp.dtype)[micro.seq_ids]
                old_lp = old[micro.target_index].to(logp) if old is not None else logp.detach()
                if old is None and c.logging.rollouts:  # on-policy single pass: the ratio's old is this forward
                    parts = old_lp.float().split([batch.num_trained[i] for i in micro.samples.tolist()])
                    for i, lp in zip(micro.samples.tolist(), parts, strict=True):
                        batch.samples[i].old_logprobs = lp.tolist()
                ref_lp = ref[micro.target_index].to(logp) if ref is not None else None
                is_weight = weights[micro.target_index].to(logp) if weights is not None else None
                loss, st = policy_loss(c.loss, logp, old_lp, adv, micro.seq_ids, len(micro.samples), norm,
                                       ref_logp=ref_lp, is_weight=is_weight)
                finite = finite and bool(torch.isfinite(loss))
                loss_total += loss.item()
                stats.add(clip_low=st["clip_low"], clip_high=st["clip_high"], tokens=st["tokens"], kl=st["kl"],
                          entropy=entropy.detach().sum(), micro_batches=1,
                          log_ratio_abs=(logp.detach() - old_lp).abs().sum())
                total = loss * acc.num_processes  # DDP averages gradients; the normaliser is already global
                if aux is not None:  # as SFT: the router's coefficient, averaged over this process's rows
                    total = total + self.core.config.router_aux_loss_coef * aux / len(rows)
                    stats.add(aux_loss=aux.detach(), aux_micro_batches=1)
                acc.backward(total)
        if self.before_optimizer_step is not None:
            self.before_optimizer_step(self)
        grad_norm = self.chassis.optimizer_step(finite)  # clipped; None: skipped, nothing moved
        if grad_norm is not None:
            stats.add(updates=1, grad_norm=grad_norm, loss=loss_total)
        else:
            self.skipped_updates += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s): optimizer step skipped, weights unchanged",
                           self.step_count, loss_total)
            stats.add(skipped=1)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Outcome accuracy on the held-out prompts (fixed seed, so steps compare)."""
        if not self.collector.eval_rows:
            return {}
        engine = self.engine
        if self.async_rollouts is not None:  # the producer owns self.engine; evaluate the trained policy itself
            engine = self._build_engine(self.core)
        outs = self.collector.evaluate(engine, self.step_count)
        return {"eval/accuracy": outcome_accuracy([self.collector.outcome(r) for r in outs]),
                "eval/mean_length": sum(len(r.completion_ids) for r in outs) / max(len(outs), 1)}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _checkpoint_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint keeps beside the chassis' (model, optimizer, schedule, prompt order, RNG states, async's
        batches generated ahead: the producer settled first, so that its position is theirs)."""
        if self.async_rollouts is not None:
            self.async_rollouts.settle()
        return {"round": self.collector.rounds, "skipped_updates": self.skipped_updates, "history": self.history,
                "rollout_correction": self._correction_settings, "async_rollout": self.async_rollouts is not None}

    @property
    def _correction_settings(self) -> dict[str, Any]:
        return {"on": self.correction is not None, **asdict(self.config.rollout_correction)}

    def _resume(self) -> None:
        """The checkpoint ``run.resume`` names, restored (a fresh start at step 0 without one)."""
        def same_mode(state: dict[str, Any]) -> None:  # an asynchronous run's checkpoints hold its queued batches
            if (was := bool(state.get("async_rollout"))) != (self.async_rollouts is not None):
                raise ValueError(f"cannot resume from {self.chassis.checkpoints.resumed_from}: it was written with "
                                 f"async_rollout.enabled: {str(was).lower()}, this run has {str(not was).lower()}; "
                                 "use the same setting, another checkpoint.output_dir or run.resume: null")

        state = self.chassis.resume(self.config.run.resume, same_mode)
        if state is None:
            return
        self.step_count, self.collector.rounds = int(state["step"]), int(state["round"])
        self.skipped_updates = int(state["skipped_updates"])
        self.history = list(state["history"])
        if self.rollout_model is not None:  # the producer generates on from the checkpoint's weights
            self.rollout_model.load_state_dict(self.core.state_dict())
        saved, now = state.get("rollout_correction"), self._correction_settings
        if saved is not None and saved != now:
            logger.warning("resumed from %s with different rollout_correction settings: the checkpoint's %s, now %s",
                           self.chassis.checkpoints.resumed_from, saved, now)

    def save_final(self) -> Path:
        """``final/`` as every stage writes it (``posttrain.train.run.save_final``: LoRA merged, the manifest)."""
        c, loss = self.config, self.history[-1].get("loss", math.nan) if self.history else math.nan
        return save_final(self, c, self.tokenizer, "grpo", self.recipe, self.base,
                          TrainResult(self.step_count, loss, self.output_dir / "metrics.jsonl", self.core),
                          data=[c.data.path] if c.data.path else [],
                          eval_data=[data_provenance(c.eval.path)] if c.eval.path else [])

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Steps up to ``run.steps`` on the chassis' loop, held-out evaluations, checkpoints and the final policy
        (``final/``); returns every step's metrics."""
        c = self.config
        if c.eval.temperature == 0 and c.eval.num_samples > 1:
            raise ValueError("eval.num_samples > 1 needs eval.temperature > 0 (greedy samples are identical)")
        start, every = self.step_count, c.eval.every_steps

        def step(i: int) -> dict[str, float]:
            metrics = self.step()
            done = self.step_count
            if self.collector.eval_rows and ((every and done % every == 0) or done == c.run.steps):
                metrics.update(self.evaluate())
            return metrics

        # the starting policy's held-out accuracy, as step 0
        at_start = (lambda: {"step": 0.0, **self.evaluate()}) if start == 0 and self.collector.eval_rows else None
        try:
            self.chassis.run(start, c.run.steps, step, self._checkpoint_state, run_config=config_to_dict(c),
                             figures=progress_figures, at_start=at_start)
            if start < c.run.steps:
                self.save_final()
        finally:
            self.close()
        return self.history
