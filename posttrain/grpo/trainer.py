"""The GRPO loop: generate G completions per prompt, score them, compute group advantages, and take several
optimizer steps on them with the configured policy loss (DAPO by default).

One step (``GrpoTrainer.step``):
  1. rollout: each process samples its share of the generation batch through the rollout engine (``rollout.engine``,
     chosen through ``posttrain.rollout.registry``; the trainer asks only for its declared capabilities)
     and scores it with the weighted rewards; the completions and rewards are gathered so every process holds the
     whole batch (lists of ints: cheap) and takes the same decisions without waiting on another;
  2. dynamic sampling: groups whose outcome metric (the verifier, not the shaped total) is uniform are dropped and
     more prompts are generated until the batch is full or ``dynamic_sampling.max_rounds`` is reached;
  3. advantages per group over the whole group, wherever its completions were generated;
  4. update: the batch is split into ``optim.mini_batches`` mini-batches, each split across processes and packed
     into padding-free rows under ``optim.micro_batch_tokens``; ``optim.num_iterations`` passes; the importance
     ratio uses the log-probabilities of the policy that generated the batch; the loss normaliser (DAPO's token
     count) is counted over the whole mini-batch on all processes. Log-probabilities come from the model's fused
     chunked kernel (``token_logprobs``), never from a full logits tensor.
A step whose loss or gradient is not finite is skipped with a warning; the weights and optimizer state are left
as they were. This module must never write outside ``run.output_dir`` nor change the rewards' values.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import config_to_dict
from posttrain.families import core_model, is_in_tree
from posttrain.grpo.config import GrpoConfig
from posttrain.grpo.data import PromptSampler, load_prompt_rows, pack_micro_batches, tokenize_prompts
from posttrain.grpo.loss import group_advantages, loss_normalizer, policy_loss, rollout_correction
from posttrain.rewards import RewardSet, WeightedReward, get
from posttrain.rollout import SamplingParams
from posttrain.tokenizer import completion_text

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One completion of one group, with what scoring it gave."""

    group: int
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    finish_reason: str
    rewards: dict[str, float | None]
    total: float | None
    advantage: float = 0.0
    completion_mask: list[int] | None = None  # multi-turn: 1 on the model's tokens, 0 on tool/template tokens
    messages: list[dict] | None = None  # multi-turn: the assistant and tool messages after the prompt
    policy_version: int = 0  # optimizer steps (generation steps) the generating policy had taken
    staleness: int = 0  # steps between the generating policy and the one trained on this sample
    # filled by the update, for ``logging.rollouts``: what the ratio used and the reference's, per trained token
    old_logprobs: list[float] | None = None
    ref_logprobs: list[float] | None = None

    @property
    def trained_ids(self) -> list[int]:
        """The completion tokens the loss is computed on (all of them, except tool answers in multi-turn)."""
        if self.completion_mask is None:
            return self.completion_ids
        return [t for t, m in zip(self.completion_ids, self.completion_mask, strict=True) if m]

    @property
    def num_trained(self) -> int:
        return len(self.completion_ids) if self.completion_mask is None else sum(self.completion_mask)


@dataclass
class StepStats:
    """Sums over a step's micro-batches, reduced over processes before they become metrics."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, **kv: float) -> None:
        for k, v in kv.items():
            self.values[k] = self.values.get(k, 0.0) + float(v)


def load_policy(folder: str, dtype: str, field: str, module_class: str | None):
    """The model in ``folder``: the in-tree class for the in-tree families, unless ``module_class`` (what the engine
    decodes, see ``EngineSpec.module_class``) is ``transformers``; transformers' own class for any other family."""
    from posttrain.families import check_trainable, load_causal_lm, read_model_type
    from posttrain.models.hybrid import IN_TREE_MODEL_TYPES, HybridForCausalLM

    if read_model_type(folder, field)[0] in IN_TREE_MODEL_TYPES and module_class != "transformers":
        return HybridForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    check_trainable(folder, field)
    return load_causal_lm(folder, field, dtype=getattr(torch, dtype))


def final_hidden(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The last layer's normed hidden states (1, L, H) of a packed row (``positions`` restart at 0 at each sequence),
    through ``model`` itself (a DDP wrapper syncs its gradients): the in-tree model without logits; a transformers
    model without a cache, its packed-sequence masks read off the positions, and the logits of one position only."""
    if is_in_tree(model):
        return model(ids, position_ids=positions, return_logits=False).hidden_states
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(core_model(model).forward).parameters else {}
    out = model(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True, **extra)
    return out.hidden_states[-1]


def head_logprobs(core, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """Log-probs (and entropies) of ``targets`` under ``core``'s output layer at ``temperature``, by the fused chunked
    kernel (no full logits tensor); a transformers model's head is its output embeddings, Granite's logits divided by
    its ``logits_scaling``."""
    if is_in_tree(core):
        return core.token_logprobs(hidden, targets, temperature=temperature, return_entropy=entropy)
    from posttrain.kernels import fused_linear_logprobs

    head, config = core.get_output_embeddings(), core.config
    if getattr(head, "bias", None) is not None or getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"model.path: GRPO computes log-probabilities with the fused kernel, which has no output "
                         f"bias or logit soft-capping; the {config.model_type} model has one")
    return fused_linear_logprobs(hidden, head.weight, targets, temperature=temperature,
                                 logits_scaling=getattr(config, "logits_scaling", 1.0), return_entropy=entropy)


def _seed_for(seed: int, round_index: int, first_prompt: int) -> int:
    return (seed * 1_000_003 + round_index * 7_919 + first_prompt) % (2**62)


class GrpoTrainer:
    """GRPO/DAPO training of a causal LM: the in-tree ``HybridForCausalLM`` for the in-tree families (Granite 4.0-H,
    dense Granite) unless the engine decodes transformers' classes, transformers' own class for any other family.
    Everything the config names can be given directly instead (``model``, ``tokenizer``, ``rows``, ``eval_rows``,
    ``reward_set``) for tests and notebooks."""

    def __init__(self, config: GrpoConfig, model=None, tokenizer=None, rows: list[dict] | None = None,
                 eval_rows: list[dict] | None = None, reward_set: RewardSet | None = None, accelerator=None,
                 env=None):
        from accelerate import Accelerator

        from posttrain.tokenizer import load_tokenizer
        from posttrain.train.checkpointing import CheckpointManager
        from posttrain.train.schedules import build_scheduler

        self.config = c = config
        self.output_dir = Path(c.run.output_dir)
        # cpu=True without CUDA: under ``accelerate launch --multi_gpu`` that makes the processes one gloo group
        self.accelerator = accelerator or Accelerator(log_with=c.logging.report_to or None,
                                                      project_dir=str(self.output_dir),
                                                      cpu=not torch.cuda.is_available())
        acc = self.accelerator
        if c.rollout.prompts_per_step % acc.num_processes:
            raise ValueError(f"rollout.prompts_per_step={c.rollout.prompts_per_step} must be a multiple of the "
                             f"number of processes ({acc.num_processes})")
        torch.manual_seed(c.run.seed)
        from posttrain.rollout.registry import choose_engine

        # the engine, checked against the model's family and what this run needs, before anything loads or is written
        self.engine_family = getattr(getattr(model, "config", None), "model_type", None) if model is not None else None
        self.engine_needs = {"weight_sync"} | ({"shares_module"} if c.async_rollout.enabled else set())
        if model is None and not c.model.path:
            raise ValueError("model.path: no checkpoint given")
        self.engine_spec = choose_engine(c.rollout.engine, None if model is not None else c.model.path,
                                         family=self.engine_family, field="rollout.engine", needs=self.engine_needs)
        if model is None:
            model = load_policy(c.model.path, c.model.dtype, "model.path", self.engine_spec.module_class)
        if not is_in_tree(model):  # the update packs samples into padding-free rows: they must stay apart
            from posttrain.families import check_packed_rows

            check_packed_rows(model, "model.path")
        if tokenizer is None:
            tokenizer = load_tokenizer(c.model.tokenizer or c.model.path)
        self.tokenizer = tokenizer
        self.env = env  # multi-turn tool use: a posttrain.grpo.tools.ToolEnvironment (or built from tools.names)
        if self.env is None and c.tools.names:
            from posttrain.grpo.tools import ToolEnvironment, load_tool

            self.env = ToolEnvironment([load_tool(name) for name in c.tools.names], c.tools.max_output_chars)
        tools = self.env.schemas if self.env is not None else None
        if rows is None:
            if not c.data.path:
                raise ValueError("data.path: no prompts given")
            rows = load_prompt_rows(c.data.path, c.data.prompt_column)
        self.rows, self.prompt_ids, self.dropped_long_prompts = tokenize_prompts(
            rows, tokenizer, c.data.prompt_column, c.data.max_prompt_tokens, c.data.long_prompts, tools=tools)
        if eval_rows is None and c.eval.path:
            eval_rows = load_prompt_rows(c.eval.path, c.data.prompt_column)
        self.eval_rows, self.eval_prompt_ids = [], []
        if eval_rows:
            self.eval_rows, self.eval_prompt_ids, _ = tokenize_prompts(
                eval_rows[: c.eval.max_prompts], tokenizer, c.data.prompt_column, c.data.max_prompt_tokens, "drop",
                tools=tools)

        self.reward_set = reward_set or RewardSet.from_specs(c.rewards.rewards)
        scored_by = [r.name for r in self.reward_set.rewards]  # the user's rewards, before shaping is appended
        if c.overlong.buffer > 0:  # L_max: a completion's limit (with tools, the whole trajectory's)
            if c.overlong.buffer > self._max_completion_tokens:
                raise ValueError(f"overlong.buffer={c.overlong.buffer} exceeds the completion limit "
                                 f"{self._max_completion_tokens}")
            overlong = get("overlong", max_len=self._max_completion_tokens, cache_len=c.overlong.buffer)
            self.reward_set = RewardSet([*self.reward_set.rewards,
                                         WeightedReward("overlong", overlong, c.overlong.weight, in_process=True)])
        labels = [r.name for r in self.reward_set.rewards]
        # The outcome (accuracy, dynamic sampling): the configured reward, or else, sample by sample, the first of the
        # user's rewards that scores it (a math verifier on math prompts, a tool-call checker on tool prompts).
        metric = c.dynamic_sampling.metric
        if metric is not None and metric not in labels:
            raise ValueError(f"dynamic_sampling.metric {metric!r} is not the label of a reward (labels: {labels})")
        self.outcome_labels = [metric] if metric is not None else scored_by
        self._pool = None

        if c.logging.rollouts:  # before any work: a run that cannot keep its rollouts stops here
            path = self.output_dir / "rollouts.jsonl"
            try:
                if acc.is_main_process:
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                    with path.open("a"):
                        pass
            except OSError as e:
                raise ValueError(f"logging.rollouts: cannot write {path}: {e.strerror or e}") from None
        model.train()
        self.ref_model = None
        if c.loss.beta > 0:
            if c.model.ref_path:
                if not (Path(c.model.ref_path) / "config.json").is_file():
                    raise ValueError(f"model.ref_path: no checkpoint (config.json) in {c.model.ref_path}")
                self.ref_model = load_policy(c.model.ref_path, c.model.dtype, "model.ref_path",
                                             "in-tree" if is_in_tree(model) else "transformers")
            elif not hasattr(model, "disable_adapter"):  # with LoRA the reference is the policy, adapters off
                self.ref_model = copy.deepcopy(model)
            if self.ref_model is not None:
                self.ref_model.eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.optim.lr, betas=tuple(c.optim.betas), eps=c.optim.eps,
                                      weight_decay=c.optim.weight_decay)
        total_updates = max(1, c.run.steps * c.optim.mini_batches * c.optim.num_iterations)
        self.scheduler = build_scheduler(optimizer, c.optim.schedule, total_updates, c.optim.warmup_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.ref_model is not None:  # never prepared (no gradients), so moved to the policy's device here
            self.ref_model.to(acc.device)
        self.rollout_model = None  # async: the producer's own copy of the policy
        self.async_rollouts = None
        if c.async_rollout.enabled:
            from posttrain.rollout.async_rollout import AsyncRollouts

            if acc.num_processes > 1:  # the producer's gathers would interleave with the trainer's all-reduces
                raise ValueError("async_rollout.enabled supports one training process for now")

            self.rollout_model = copy.deepcopy(self.core).eval().requires_grad_(False)
            self.async_rollouts = AsyncRollouts(self._produce_batch, self._load_rollout_weights,
                                                c.async_rollout.max_staleness)
        self.engine = self._build_engine()
        self._tool_template = None
        rc = c.rollout_correction
        corrects = c.rollout_correction_on(self.engine.capabilities.shares_module) or (
            rc.enabled is None and self.core.dtype == torch.bfloat16 and not c.async_rollout.enabled
            and (rc.weights, rc.mask) != ("none", "none"))
        self.correction = rc if corrects else None
        self.sampler = PromptSampler(len(self.rows), seed=c.run.seed, shuffle=c.data.shuffle)
        self.step_count = 0
        self.round_count = 0
        self.skipped_updates = 0
        self.history: list[dict[str, float]] = []
        self.checkpoints = CheckpointManager(acc, self.output_dir / "checkpoints", keep_last=2,
                                             verify=c.run.checkpoint_verify)
        self.checkpoints.register(self.scheduler, self.sampler)
        self.last_batch: list[Rollout] = []  # the last step's groups after dynamic sampling, with advantages
        self.before_optimizer_step: Callable[[GrpoTrainer], None] | None = None
        if c.run.resume:
            self.load_checkpoint(c.run.resume)

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def core(self):
        """The bare ``HybridForCausalLM`` (no DDP wrapper, no adapters)."""
        m = self.accelerator.unwrap_model(self.model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _build_engine(self, model=None):
        """The configured engine on ``model`` (default: the policy, or async's copy of it), starting from the
        trainer's weights."""
        from posttrain.rollout.registry import build_engine
        from posttrain.rollout.weight_sync import SyncGroupConfig

        c, r = self.config, self.config.rollout
        if model is None:
            model = self.rollout_model if self.rollout_model is not None else self.accelerator.unwrap_model(self.model)
        backend = r.sync_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        engine = build_engine(self.engine_spec.name, None, family=self.engine_family or self.core.config.model_type,
                              field="rollout.engine", needs=self.engine_needs, model=model, tokenizer=self.tokenizer,
                              seed=c.run.seed, max_model_len=c.data.max_prompt_tokens + r.max_new_tokens,
                              gpu_memory_utilization=r.vllm_gpu_memory_utilization, sleep_mode=r.vllm_sleep,
                              url=r.server_url, processes=self.accelerator.num_processes,
                              sync_group=SyncGroupConfig(host=r.sync_host, port=r.sync_port, world_size=2,
                                                         backend=backend, timeout_s=r.sync_timeout_s))
        engine.sync_weights(self.core)  # the engine starts from the trainer's weights (a no-op on the same module)
        return engine

    @property
    def pool(self):
        if self._pool is None and self.config.rewards.num_workers > 0:
            from posttrain.rewards import RewardPool

            self._pool = RewardPool(num_workers=self.config.rewards.num_workers, timeout_s=self.config.rewards.timeout_s)
        return self._pool

    def close(self) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.engine.capabilities.close:  # vLLM: its temporary weights folder; a server: the sync group
            self.engine.close()

    def _completion_for_reward(self, row: dict, ids: list[int]):
        text = completion_text(self.tokenizer, ids)  # markup included, less the closing EOS
        prompt = row[self.config.data.prompt_column]
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    def _reward_trainer_state(self):
        """What rewards get as ``trainer_state`` (TRL's argument): steps done, steps planned, epochs of prompts."""
        from posttrain.rewards.base import reward_trainer_state

        s = self.sampler
        return reward_trainer_state(self.step_count, self.config.run.steps, s.epoch + s.cursor / max(s.size, 1))

    def _sampling(self, n: int, temperature: float, seed: int) -> SamplingParams:
        r = self.config.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=temperature,
                              top_p=r.top_p if temperature > 0 else 1.0, top_k=r.top_k if temperature > 0 else 0,
                              n=n, eos_token_id=self.tokenizer.eos_token_id, seed=seed)

    def _generate_and_score(self, prompt_rows: list[int], prompt_ids: list[list[int]], rows: list[dict], n: int,
                            temperature: float, round_index: int, times: dict[str, float],
                            engine=None) -> list[Rollout]:
        """This process's share of ``prompt_rows`` generated and scored, then everyone's gathered (in order)."""
        acc = self.accelerator
        engine = engine or self.engine
        share = len(prompt_rows) // acc.num_processes
        lo, hi = acc.process_index * share, (acc.process_index + 1) * share
        chunk = self.config.rollout.prompts_per_call or max(share, 1)
        local: list[Rollout] = []
        t0 = time.perf_counter()
        for start in range(lo, hi, chunk):
            idx = list(range(start, min(start + chunk, hi)))
            params = self._sampling(n, temperature, _seed_for(self.config.run.seed, round_index, start))
            if self.env is not None:
                local += self._multi_turn(engine, idx, prompt_rows, prompt_ids, rows, params)
                continue
            outs = engine.generate([prompt_ids[prompt_rows[i]] for i in idx], params)
            for o in outs:
                g = idx[o.prompt_index]
                local.append(Rollout(g, prompt_rows[g], prompt_ids[prompt_rows[g]], o.token_ids, o.logprobs,
                                     o.finish_reason, {}, None))
        t1 = time.perf_counter()
        errors = 0
        if local:
            batch_rows = [rows[r.prompt_index] for r in local]
            columns = {k: [row.get(k) for row in batch_rows] for k in batch_rows[0]
                       if k not in (self.config.data.prompt_column, "_where")}
            columns["completion_ids"] = [r.completion_ids for r in local]
            result = self.reward_set.score([row[self.config.data.prompt_column] for row in batch_rows],
                                           [r.messages if r.messages is not None  # the whole trajectory
                                            else self._completion_for_reward(row, r.completion_ids)
                                            for row, r in zip(batch_rows, local, strict=True)],
                                           pool=self.pool, trainer_state=self._reward_trainer_state(), **columns)
            result.raise_for_errors(self.config.rewards.max_error_fraction)
            errors = len(result.errors)
            for name, logged in result.logged_metrics.items():  # the rewards' log_metric calls, averaged
                times[f"log_metric/{name}"] = sum(logged) / len(logged)
            for i, r in enumerate(local):
                r.rewards = {name: values[i] for name, values in result.values.items()}
                r.total = result.total[i]
        t2 = time.perf_counter()
        times["generate"] = times.get("generate", 0.0) + t1 - t0
        times["reward"] = times.get("reward", 0.0) + t2 - t1
        times["reward_errors"] = times.get("reward_errors", 0.0) + errors
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        return local

    def _multi_turn(self, engine, idx: list[int], prompt_rows: list[int], prompt_ids: list[list[int]], rows: list[dict],
                    params: SamplingParams) -> list[Rollout]:
        """Multi-turn rollouts with the tool environment for the prompts ``idx``, many trajectories per engine call."""
        from posttrain.rollout.multiturn import ToolTurnTemplate, multi_turn_rollout

        c = self.config
        if self._tool_template is None:
            self._tool_template = ToolTurnTemplate(self.tokenizer)
        messages = [rows[prompt_rows[i]][c.data.prompt_column] for i in idx]
        trajs = multi_turn_rollout(engine, self.tokenizer, self.env, [prompt_ids[prompt_rows[i]] for i in idx],
                                   messages, params, c.tools.max_turns, c.tools.max_tokens, self._tool_template)
        out = []
        for t in trajs:
            g = idx[t.prompt_index]
            out.append(Rollout(g, prompt_rows[g], prompt_ids[prompt_rows[g]], t.completion_ids, t.logprobs,
                               "length" if t.finish_reason == "length" else "stop", {}, None,
                               completion_mask=t.loss_mask, messages=t.messages))
        return out

    def _produce_batch(self):
        """One step's generation (the producer thread's job in async mode)."""
        times: dict[str, float] = {}
        groups, generated, counts = self.collect(times)
        return groups, generated, counts, times

    @torch.no_grad()
    def _load_rollout_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.rollout_model.load_state_dict(state_dict)

    def _outcome(self, rollout: Rollout) -> float | None:
        return next((v for v in (rollout.rewards.get(k) for k in self.outcome_labels) if v is not None), None)

    def _uniform(self, group: list[Rollout]) -> bool:
        values = {self._outcome(r) for r in group}
        values.discard(None)
        return len(values) <= 1

    def collect(self, times: dict[str, float]) -> tuple[list[list[Rollout]], list[Rollout], dict[str, float]]:
        """The step's groups after dynamic sampling, every completion generated, and the sampling counts."""
        c = self.config
        need, G = c.rollout.prompts_per_step, c.rollout.num_generations
        kept: list[list[Rollout]] = []
        generated: list[Rollout] = []
        rounds = dropped = n_groups = 0
        max_rounds = c.dynamic_sampling.max_rounds if c.dynamic_sampling.enabled else 1
        while len(kept) < need and rounds < max_rounds:
            prompt_rows = self.sampler.take(need)
            outs = self._generate_and_score(prompt_rows, self.prompt_ids, self.rows, G, c.rollout.temperature,
                                            self.round_count, times)
            self.round_count += 1
            rounds += 1
            generated += outs
            for g in range(need):
                group = outs[g * G:(g + 1) * G]
                n_groups += 1
                if c.dynamic_sampling.enabled and self._uniform(group):
                    dropped += 1
                else:
                    kept.append(group)
        kept = kept[:need]
        counts = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/generated_groups": n_groups,
                  "dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/kept_groups": len(kept)}
        if len(kept) < need:
            logger.warning("step %d: %d of %d groups after %d generation rounds (dynamic sampling dropped %d)",
                           self.step_count, len(kept), need, rounds, dropped)
        return kept, generated, counts

    # -- the update ---------------------------------------------------------------------------------------------
    def _logprobs(self, model, samples: list[Rollout], entropy: bool = False, head=None):
        """Per-token log-probs (and entropies) of the completions, the samples packed in one padding-free row.

        ``model`` gives the hidden states and ``head`` (default: the policy) the output layer: the reference model
        must score with its own. A model other than the prepared policy runs under the policy's autocast."""
        device = self.core.device
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        ids = torch.tensor([t for s in seqs for t in s[:-1]], device=device)[None]
        positions = torch.cat([torch.arange(len(s) - 1, device=device) for s in seqs])[None]
        target_pos, offset = [], 0
        for s in samples:  # the positions predicting the trained tokens (tool answers are context, never targets)
            lp, lc = len(s.prompt_ids), len(s.completion_ids)
            start = offset + lp - 1
            if s.completion_mask is None:
                target_pos.extend(range(start, start + lc))
            else:
                target_pos.extend(start + i for i, m in enumerate(s.completion_mask) if m)
            offset += lp + lc - 1
        target_pos = torch.tensor(target_pos, dtype=torch.long, device=device)
        targets = torch.tensor([t for s in samples for t in s.trained_ids], device=device)
        autocast = contextlib.nullcontext() if model is self.model else self.accelerator.autocast()
        with autocast:
            hidden = final_hidden(model, ids, positions)[0, target_pos]
        result = head_logprobs(head or self.core, hidden, targets, self.config.rollout.temperature, entropy)
        seq_ids = torch.repeat_interleave(torch.arange(len(samples), device=device),
                                          torch.tensor([s.num_trained for s in samples], device=device))
        return result, seq_ids

    @torch.no_grad()
    def _frozen_logprobs(self, samples: list[Rollout], which: str) -> list[torch.Tensor]:
        """Per-sample log-probs under the current policy (``old``) or the reference model (``ref``), no grad."""
        out: list[torch.Tensor | None] = [None] * len(samples)
        budget = self.config.optim.micro_batch_tokens
        for idxs in pack_micro_batches([len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples], budget):
            part = [samples[i] for i in idxs]
            if which == "ref" and self.ref_model is None:  # LoRA: the reference is the model with adapters off
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    lp, _ = self._logprobs(self.model, part)
            elif which == "ref":  # the reference's own weights end to end, its output layer included
                lp, _ = self._logprobs(self.ref_model, part, head=self.ref_model)
            else:
                lp, _ = self._logprobs(self.model, part)
            for i, chunk in zip(idxs, lp.float().split([s.num_trained for s in part]), strict=True):
                out[i] = chunk
        return out  # type: ignore[return-value]

    def _shard(self, items: list, parts: int, index: int) -> list:
        """The ``index``-th of ``parts`` contiguous, nearly equal slices."""
        n = len(items)
        lo, hi = n * index // parts, n * (index + 1) // parts
        return items[lo:hi]

    def update(self, samples: list[Rollout], stats: StepStats) -> None:
        c, acc = self.config, self.accelerator
        W, rank = acc.num_processes, acc.process_index
        minis = [self._shard(samples, c.optim.mini_batches, m) for m in range(c.optim.mini_batches)]
        local = [self._shard(mini, W, rank) for mini in minis]
        flat_local = [s for part in local for s in part]
        off_policy = self.async_rollouts is not None
        device = self.core.device
        truncated_sampling = c.rollout.top_p < 1 or c.rollout.top_k > 0
        need_old = (c.optim.mini_batches * c.optim.num_iterations > 1 or self.correction is not None or off_policy
                    or truncated_sampling)
        recompute = c.rollout.recompute_old_logprobs
        if recompute is None:
            # an engine decoding the trainer's own module in float32 sampled with the trainer's log-probs
            recompute = not (self.engine.capabilities.shares_module and self.core.dtype == torch.float32)
        if truncated_sampling or self.correction is not None:
            # the sampler's log-probs are of the truncated distribution (or another engine's): the ratio's old
            # policy is the trainer's own, and the sampler's serve the correction only
            recompute = True
        if off_policy:  # the ratio is against the generating policy, whose log-probs only the sampler has
            recompute = False
        self.model.eval()  # no dropout in the hybrid; eval only marks the no-grad pass
        old = None
        sampler = [torch.tensor(s.sampler_logprobs, dtype=torch.float32, device=device) for s in flat_local]
        if need_old and flat_local:
            old = self._frozen_logprobs(flat_local, "old") if recompute else sampler
        ref = self._frozen_logprobs(flat_local, "ref") if c.loss.beta > 0 and flat_local else None
        self.model.train()
        weights = None
        if old is not None and recompute:
            weights = self._rollout_correction(flat_local, old, sampler, stats)
        if c.logging.rollouts:
            for i, s in enumerate(flat_local):
                s.old_logprobs = old[i].tolist() if old is not None else None
                s.ref_logprobs = ref[i].tolist() if ref is not None else None
        position = {id(s): i for i, s in enumerate(flat_local)}
        for _ in range(c.optim.num_iterations):
            for mini, mine in zip(minis, local, strict=True):
                if not mini:  # fewer samples than mini-batches: no optimizer step on an empty one (Adam's momentum
                    continue  # alone would move the weights)
                norm = loss_normalizer(c.loss.type, [s.num_trained for s in mini], self._max_completion_tokens)
                self._optimizer_step(mine, norm, old, ref, position, stats, weights)

    def _rollout_correction(self, samples: list[Rollout], old: list[torch.Tensor], sampler: list[torch.Tensor],
                            stats: StepStats) -> list[torch.Tensor] | None:
        """The mismatch between the sampler's and the trainer's log-probs, logged; per sample, its rollout
        correction weights (None: correction off)."""
        rc = self.correction
        weights = [] if rc is not None else None
        for lp, slp in zip(old, sampler, strict=True):
            log_rho = lp.double() - slp.double()
            stats.add(mismatch_sum=log_rho.abs().sum().item(), mismatch_tokens=log_rho.numel(),
                      mismatch_kl=(torch.exp(log_rho) - log_rho - 1).sum().item())
            if rc is not None:
                w, masked = rollout_correction(log_rho, rc.weights, rc.cap, rc.mask, rc.mask_threshold)
                weights.append(w.float())
                stats.add(correction_weight=w.sum().item(), correction_capped=(w >= rc.cap).sum().item() * (not masked),
                          correction_masked=float(masked), correction_samples=1)
        return weights

    @property
    def _max_completion_tokens(self) -> int:
        """L of dr_grpo's constant normaliser: a turn's limit, or a trajectory's with tools."""
        return self.config.tools.max_tokens if self.env is not None else self.config.rollout.max_new_tokens

    def _optimizer_step(self, mine: list[Rollout], norm: float, old, ref, position, stats: StepStats,
                        weights=None) -> None:
        c, acc = self.config, self.accelerator
        W = acc.num_processes
        rows = pack_micro_batches([len(s.prompt_ids) + len(s.completion_ids) - 1 for s in mine],
                                  c.optim.micro_batch_tokens) or [[]]
        finite = True
        loss_total = 0.0
        for j, idxs in enumerate(rows):
            sync = contextlib.nullcontext() if j == len(rows) - 1 else acc.no_sync(self.model)
            with sync:
                if not idxs:  # nothing here for this process: a zero loss keeps the gradient all-reduce in step
                    ids = torch.zeros(1, 1, dtype=torch.long, device=self.core.device)
                    acc.backward(final_hidden(self.model, ids, torch.zeros_like(ids)).sum() * 0.0)
                    continue
                part = [mine[i] for i in idxs]
                (logp, entropy), seq_ids = self._logprobs(self.model, part, entropy=True)
                adv = torch.tensor([s.advantage for s in part], dtype=logp.dtype, device=logp.device)[seq_ids]
                old_lp = (torch.cat([old[position[id(s)]] for s in part]).to(logp) if old is not None
                          else logp.detach())
                if old is None and c.logging.rollouts:  # on-policy single pass: the ratio's old is this forward
                    for s, lp in zip(part, old_lp.float().split([s.num_trained for s in part]), strict=True):
                        s.old_logprobs = lp.tolist()
                ref_lp = torch.cat([ref[position[id(s)]] for s in part]).to(logp) if ref is not None else None
                is_weight = None
                if weights is not None:
                    is_weight = torch.cat([weights[position[id(s)]] for s in part]).to(logp)
                loss, st = policy_loss(c.loss, logp, old_lp, adv, seq_ids, len(part), norm, ref_logp=ref_lp,
                                       is_weight=is_weight)
                finite = finite and bool(torch.isfinite(loss))
                loss_total += loss.item()
                stats.add(clip_low=st["clip_low"], clip_high=st["clip_high"], tokens=st["tokens"], kl=st["kl"],
                          entropy=entropy.detach().sum(), micro_batches=1,
                          log_ratio_abs=(logp.detach() - old_lp).abs().sum())
                acc.backward(loss * W)  # DDP averages gradients over processes; the normaliser is already global
        if self.before_optimizer_step is not None:
            self.before_optimizer_step(self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optim.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(params, c.optim.max_grad_norm)
        else:
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else 0.0
        grad_norm = float(grad_norm)
        ok = torch.tensor([1.0 if finite and math.isfinite(grad_norm) else 0.0], device=acc.device)
        if W > 1:
            ok = acc.reduce(ok, reduction="sum") / W
        if bool(ok.item() == 1.0):
            self.optimizer.step()
            self.scheduler.step()
            stats.add(updates=1, grad_norm=grad_norm, loss=loss_total)
        else:
            self.skipped_updates += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): optimizer step skipped, "
                           "weights unchanged", self.step_count, loss_total, grad_norm)
            stats.add(skipped=1)
        self.optimizer.zero_grad(set_to_none=True)

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        c = self.config
        G = c.rollout.num_generations
        if self.async_rollouts is not None:
            version, (groups, generated, counts, times) = self.async_rollouts.next_batch(self.step_count)
            times = dict(times)
            for r in generated:
                r.policy_version, r.staleness = version, self.step_count - version
        else:
            times = {}
            groups, generated, counts = self.collect(times)
            for r in generated:
                r.policy_version = self.step_count
        samples = [r for g in groups for r in g]
        if samples:
            # advantages on the CPU: a few numbers per group
            rewards = torch.tensor([r.total if r.total is not None else 0.0 for r in samples], dtype=torch.float64,
                                   device="cpu")
            scored = torch.tensor([r.total is not None for r in samples], device="cpu")
            adv = group_advantages(rewards, G, scale=c.loss.uses_std, scored=scored)
            for r, a in zip(samples, adv.tolist(), strict=True):
                r.advantage = a
        self.last_batch = samples
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
        metrics = self._metrics(generated, samples, counts, stats, times)
        self.history.append(metrics)
        if c.logging.rollouts:
            self._write_rollouts(generated, samples)
        return metrics

    def _write_rollouts(self, generated: list[Rollout], samples: list[Rollout]) -> None:
        """Append this step's completions to ``rollouts.jsonl`` (see ``LoggingConfig.rollouts``)."""
        acc = self.accelerator
        trained = {i: (s.old_logprobs, s.ref_logprobs) for i, s in enumerate(samples) if s.old_logprobs is not None}
        if acc.num_processes > 1:  # each process filled the log-probs of its own shard
            from accelerate.utils import gather_object

            merged: dict[int, Any] = {}
            for part in gather_object([trained]):
                merged.update(part)
            trained = merged
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

        with (self.output_dir / "rollouts.jsonl").open("a") as f:
            for r in generated:
                i = index.get(id(r))
                old, ref = trained.get(i, (None, None)) if i is not None else (None, None)
                n = len(r.completion_ids)
                f.write(json.dumps({
                    "step": self.step_count, "prompt_index": r.prompt_index, "prompt_ids": r.prompt_ids,
                    "completion_ids": r.completion_ids,
                    "completion_mask": r.completion_mask if r.completion_mask is not None else [1] * n,
                    "sampler_logprobs": per_token(r.sampler_logprobs, r.completion_mask, n),
                    "old_logprobs": per_token(old, r.completion_mask, n),
                    "ref_logprobs": per_token(ref, r.completion_mask, n),
                    "rewards": r.rewards, "reward": r.total, "advantage": r.advantage if i is not None else None,
                    "truncated": r.finish_reason == "length", "policy_version": r.policy_version,
                }) + "\n")

    def _metrics(self, generated: list[Rollout], samples: list[Rollout], counts: dict, stats: StepStats,
                 times: dict[str, float]) -> dict[str, float]:
        acc, G = self.accelerator, self.config.rollout.num_generations
        keys = ["clip_low", "clip_high", "tokens", "kl", "entropy", "micro_batches", "updates", "skipped",
                "grad_norm", "loss", "mismatch_sum", "mismatch_tokens", "mismatch_kl", "reward_errors",
                "log_ratio_abs", "correction_weight", "correction_capped", "correction_masked", "correction_samples"]
        local = dict(stats.values, reward_errors=times.get("reward_errors", 0.0))
        vec = torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        s = dict(zip(keys, vec.tolist(), strict=True))
        tokens = max(s["tokens"], 1.0)
        m: dict[str, float] = {"step": float(self.step_count), **{k: float(v) for k, v in counts.items()}}
        names = list(generated[0].rewards) if generated else []
        for name in names:
            vals = [r.rewards[name] for r in generated if r.rewards[name] is not None]
            m[f"rewards/{name}/mean"] = sum(vals) / len(vals) if vals else math.nan
            m[f"rewards/{name}/std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        totals = [r.total for r in generated if r.total is not None]
        m["rewards/total/mean"] = sum(totals) / len(totals) if totals else math.nan
        outcome = [self._outcome(r) for r in generated]
        outcome = [v for v in outcome if v is not None]
        m["accuracy"] = sum(outcome) / len(outcome) if outcome else math.nan
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
        if self.config.loss.beta > 0:
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
        m["optim/lr"] = self.scheduler.get_last_lr()[0]
        m["loss"] = s["loss"] / max(updates, 1)  # each process holds its share of the step's loss
        m["micro_batches"] = s["micro_batches"]
        m["time/generate_s"] = times.get("generate", 0.0)
        m["time/reward_s"] = times.get("reward", 0.0)
        m["time/train_s"] = times.get("train", 0.0)
        if self.async_rollouts is not None and generated:  # per-sample staleness, summarised
            stale = [r.staleness for r in generated]
            m["async/staleness_mean"] = sum(stale) / len(stale)
            m["async/staleness_max"] = float(max(stale))
            m["async/staleness_min"] = float(min(stale))
            m["async/policy_version"] = float(generated[0].policy_version)
        if self.env is not None and generated:
            masks = [r.completion_mask or [] for r in generated]
            m["tools/turns_mean"] = sum(1 + sum(1 for a, b in itertools.pairwise(k) if a == 0 and b == 1)
                                        for k in masks) / len(masks)
            m["tools/calls_mean"] = sum(sum(msg["role"] == "tool" for msg in (r.messages or []))
                                        for r in generated) / len(generated)
            m["tools/masked_tokens_frac"] = (sum(len(k) - sum(k) for k in masks) / max(sum(len(k) for k in masks), 1))
        return m

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Outcome accuracy on the held-out prompts (fixed seed, so steps compare)."""
        if not self.eval_rows:
            return {}
        e = self.config.eval
        n = len(self.eval_rows)
        W = self.accelerator.num_processes
        padded = list(range(n)) + [n - 1] * ((-n) % W)  # every process gets the same count; repeats not counted
        times: dict[str, float] = {}
        engine = self.engine
        if self.async_rollouts is not None:  # the producer owns self.engine; evaluate the trained policy itself
            engine = self._build_engine(self.accelerator.unwrap_model(self.model))
        outs = self._generate_and_score(padded, self.eval_prompt_ids, self.eval_rows, e.num_samples, e.temperature,
                                        -1, times, engine=engine)
        outs = outs[: n * e.num_samples]
        vals = [self._outcome(r) for r in outs]
        scored = [v for v in vals if v is not None]
        return {"eval/accuracy": sum(scored) / len(scored) if scored else math.nan,
                "eval/mean_length": sum(len(r.completion_ids) for r in outs) / max(len(outs), 1)}

    def _sampling_eval_guard(self) -> None:
        if self.config.eval.temperature == 0 and self.config.eval.num_samples > 1:
            raise ValueError("eval.num_samples > 1 needs eval.temperature > 0 (greedy samples are identical)")

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, prompt order, RNG states and counters (posttrain.train's CheckpointManager)."""
        return self.checkpoints.save(self.step_count, {"round": self.round_count,
                                                       "skipped_updates": self.skipped_updates,
                                                       "history": self.history,
                                                       "rollout_correction": self._correction_settings()})

    def _correction_settings(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"on": self.correction is not None, **asdict(self.config.rollout_correction)}

    def load_checkpoint(self, where: str | Path) -> None:
        state = self.checkpoints.resume(where)  # verified; "latest" falls back past invalid checkpoints
        if state is None:  # run.resume=latest and no checkpoint yet: a fresh run from step 0, whose logs (of a
            self._drop_logs_past(-1)  # run killed before its first checkpoint, step 0's evaluation included) go
            return
        path = self.checkpoints.resumed_from
        self.step_count, self.round_count = int(state["step"]), int(state["round"])
        self.skipped_updates = int(state["skipped_updates"])
        self.history = list(state["history"])
        saved = state.get("rollout_correction")
        if saved is not None and saved != self._correction_settings():
            logger.warning("resumed from %s with different rollout_correction settings: the checkpoint's %s, now %s",
                           path, saved, self._correction_settings())
        self._drop_logs_past(self.step_count)

    def _drop_logs_past(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: their lines in metrics.jsonl and rollouts.jsonl
        (written before the run stopped) are dropped, so no step is logged twice."""
        if not self.accelerator.is_main_process:
            return
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            path = self.output_dir / name
            if not path.is_file():
                continue
            kept = []
            with path.open() as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            kept.append(line)
                    except json.JSONDecodeError:  # a line cut by the kill: past the checkpoint by construction
                        continue
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def save_final(self) -> Path:
        """The trained policy in the checkpoint layout (safetensors + config + tokenizer), for the next stage."""
        acc = self.accelerator
        final = self.output_dir / "final"
        if acc.is_main_process:
            tmp = self.output_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.core.save_pretrained(tmp)
            self.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        from posttrain.progress import StageProgress

        c, acc = self.config, self.accelerator
        self._sampling_eval_guard()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if c.logging.report_to:
            acc.init_trackers(c.logging.project, config=_flat(config_to_dict(c)))
        progress = StageProgress("grpo", c.run.steps, self.step_count,
                                 enabled=c.logging.progress and acc.is_main_process)
        if self.step_count == 0 and self.eval_rows:
            self._log({"step": 0.0, **self.evaluate()})
        try:
            with progress:
                while self.step_count < c.run.steps:
                    metrics = self.step()
                    last = self.step_count == c.run.steps
                    if self.eval_rows and ((c.eval.every and self.step_count % c.eval.every == 0) or last):
                        metrics.update(self.evaluate())
                    if self.step_count % c.logging.log_every == 0 or last:
                        self._log(metrics)
                    if (c.run.save_every and self.step_count % c.run.save_every == 0) or last:
                        self.save_checkpoint()
                    if last:
                        self.save_final()
                    progress.advance(1, reward=f"{metrics.get('rewards/total/mean', math.nan):.3f}",
                                     acc=f"{metrics.get('accuracy', math.nan):.3f}",
                                     clip_hi=f"{metrics.get('clip/high_frac', 0):.3f}")
        finally:
            self.close()
            if c.logging.report_to:
                acc.end_training()
        return self.history

    def _log(self, metrics: dict[str, float]) -> None:
        acc = self.accelerator
        if self.config.logging.report_to:
            acc.log(metrics, step=int(metrics.get("step", self.step_count)))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
