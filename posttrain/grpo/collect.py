"""GRPO's rollout collection: prompts -> completions from an engine -> rewards -> the step's groups.

Each process samples its share of a round's prompts (seeded engine calls, or multi-turn tool rollouts), the rewards
(with DAPO's overlong shaping) score them, every process gathers the whole batch, and dynamic sampling drops groups
whose outcome is uniform and generates more rounds. The same generation and scoring serve the held-out evaluation
and the asynchronous producer. The collector holds no reference to a trainer: it builds the run's engine on the model
it is given, is given the engine and the steps done, and keeps only the prompt order, the count of generation rounds
and the reward pool. It never changes weights, computes a loss or writes a file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from posttrain.grpo.config import GrpoConfig
from posttrain.grpo.data import PromptSampler, load_prompt_rows, tokenize_prompts
from posttrain.rewards import RewardSet, WeightedReward, get
from posttrain.rewards.base import reward_trainer_state
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
class Collected:
    """One generation step: the kept groups, every completion generated (dropped groups included), the dynamic
    sampling counts, and ``times`` (seconds, reward errors and the rewards' ``log_metric/NAME`` averages)."""

    groups: list[list[Rollout]]
    generated: list[Rollout]
    counts: dict[str, float]
    times: dict[str, float]


class RolloutCollector:
    """Generates and scores GRPO's groups. ``rows``/``eval_rows``: prompt rows (None: read from ``data.path`` and
    ``eval.path``); ``env``: a ``posttrain.grpo.tools.ToolEnvironment`` (None: built from ``tools.names``, if any);
    ``reward_set`` replaces the configured rewards, with the configured pool (``close`` stops it)."""

    def __init__(self, config: GrpoConfig, tokenizer, *, reward_set: RewardSet | None = None,
                 rows: list[dict] | None = None, eval_rows: list[dict] | None = None, env=None,
                 process_index: int = 0, num_processes: int = 1):
        c = self.config = config
        if env is None and c.tools.names:
            from posttrain.grpo.tools import ToolEnvironment, load_tool

            env = ToolEnvironment([load_tool(name) for name in c.tools.names], c.tools.max_output_chars)
        self.tokenizer, self.env = tokenizer, env
        self.process_index, self.num_processes = process_index, num_processes
        if rows is None:
            if not c.data.path:
                raise ValueError("data.path: no prompts given")
            rows = load_prompt_rows(c.data.path, c.data.prompt_column)
        if eval_rows is None and c.eval.path:
            eval_rows = load_prompt_rows(c.eval.path, c.data.prompt_column)
        tools = env.schemas if env is not None else None
        self.rows, self.prompt_ids, self.dropped_long_prompts = tokenize_prompts(
            rows, tokenizer, c.data.prompt_column, c.data.max_prompt_tokens, c.data.long_prompts, tools=tools)
        self.eval_rows, self.eval_prompt_ids = [], []
        if eval_rows:
            self.eval_rows, self.eval_prompt_ids, _ = tokenize_prompts(
                eval_rows[: c.eval.max_prompts], tokenizer, c.data.prompt_column, c.data.max_prompt_tokens, "drop",
                tools=tools)
        if c.overlong.buffer > self.max_completion_tokens:  # L_max: a completion's limit (with tools, a trajectory's)
            raise ValueError(f"overlong.buffer={c.overlong.buffer} exceeds the completion limit "
                             f"{self.max_completion_tokens}")
        built, self.pool = c.rewards.build()  # the pool's workers start here, once the inputs are known to be good
        reward_set = reward_set or built
        scored_by = [r.name for r in reward_set.rewards]  # the user's rewards, before shaping is appended
        if c.overlong.buffer > 0:
            overlong = get("overlong", max_len=self.max_completion_tokens, cache_len=c.overlong.buffer)
            reward_set = RewardSet([*reward_set.rewards,
                                    WeightedReward("overlong", overlong, c.overlong.weight, in_process=True)])
        self.reward_set = reward_set
        labels = [r.name for r in reward_set.rewards]
        metric = c.dynamic_sampling.metric  # the outcome's reward (accuracy, dynamic sampling), see its field
        if metric is not None and metric not in labels:
            self.close()
            raise ValueError(f"dynamic_sampling.metric {metric!r} is not the label of a reward (labels: {labels})")
        self.outcome_labels = [metric] if metric is not None else scored_by
        self.sampler = PromptSampler(len(self.rows), seed=c.run.seed, shuffle=c.data.shuffle)
        self.rounds = 0  # generation rounds so far (each seeds its engine calls)
        self._tool_template = None

    @property
    def max_completion_tokens(self) -> int:
        """L, a completion's length limit (overlong shaping, dr_grpo's normaliser); with tools, a trajectory's."""
        return self.config.tools.max_tokens if self.env is not None else self.config.rollout.max_new_tokens

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def build_engine(self, name: str, model, family: str, needs: set[str], bf16: bool, processes: int):
        """The engine ``name`` (``posttrain.rollout.registry``) on ``model`` with the run's ``rollout`` settings."""
        from posttrain.rollout.registry import build_engine
        from posttrain.rollout.weight_sync import SyncGroupConfig

        c, r = self.config, self.config.rollout
        sync = SyncGroupConfig(host=r.sync_host, port=r.sync_port, world_size=2, timeout_s=r.sync_timeout_s,
                               backend=r.sync_backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        return build_engine(name, None, family=family, field="rollout.engine", needs=needs, model=model,
                            tokenizer=self.tokenizer, dtype="bfloat16" if bf16 else "auto", seed=c.run.seed,
                            max_model_len=c.data.max_prompt_tokens + r.max_new_tokens,
                            gpu_memory_utilization=r.vllm_gpu_memory_utilization, sleep_mode=r.vllm_sleep,
                            url=r.server_url, processes=processes, sync_group=sync)

    # -- outcomes -----------------------------------------------------------------------------------------------
    def outcome(self, rollout: Rollout) -> float | None:
        """The sample's outcome: the first outcome label's value that is not None (None: no outcome reward scored)."""
        return next((v for v in (rollout.rewards.get(k) for k in self.outcome_labels) if v is not None), None)

    def completion_for_reward(self, row: dict, ids: list[int]):
        """What a reward sees of a completion: its text (markup included, less the closing EOS), or for a chat
        prompt one assistant message holding it."""
        text = completion_text(self.tokenizer, ids)
        prompt = row[self.config.data.prompt_column]
        return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

    # -- one generation step ------------------------------------------------------------------------------------
    def collect(self, engine, step: int) -> Collected:
        """The groups of generation step ``step`` (``step`` steps done) after dynamic sampling, on ``engine``."""
        c = self.config
        need, G = c.rollout.prompts_per_step, c.rollout.num_generations
        times: dict[str, float] = {}
        kept: list[list[Rollout]] = []
        generated: list[Rollout] = []
        rounds = dropped = 0
        max_rounds = c.dynamic_sampling.max_rounds if c.dynamic_sampling.enabled else 1
        while len(kept) < need and rounds < max_rounds:
            prompt_rows = self.sampler.take(need)
            outs = self._generate_and_score(engine, prompt_rows, self.prompt_ids, self.rows, G, c.rollout.temperature,
                                            self.rounds, step, times)
            self.rounds += 1
            rounds += 1
            generated += outs
            for g in range(need):
                group = outs[g * G:(g + 1) * G]
                if c.dynamic_sampling.enabled and len({self.outcome(r) for r in group} - {None}) <= 1:
                    dropped += 1
                else:
                    kept.append(group)
        kept = kept[:need]
        counts = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/generated_groups": rounds * need,
                  "dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/kept_groups": len(kept)}
        if len(kept) < need:
            logger.warning("step %d: %d of %d groups after %d generation rounds (dynamic sampling dropped %d)",
                           step, len(kept), need, rounds, dropped)
        return Collected(kept, generated, counts, times)

    def evaluate(self, engine, step: int) -> list[Rollout]:
        """``eval.num_samples`` completions of every held-out prompt on ``engine``, scored (a fixed seed, so steps
        compare)."""
        e = self.config.eval
        n = len(self.eval_rows)
        padded = list(range(n)) + [n - 1] * ((-n) % self.num_processes)  # the same count on every process
        outs = self._generate_and_score(engine, padded, self.eval_prompt_ids, self.eval_rows, e.num_samples,
                                        e.temperature, -1, step, {})
        return outs[: n * e.num_samples]  # the repeats are not counted

    # -- generation and scoring ---------------------------------------------------------------------------------
    def _generate_and_score(self, engine, prompt_rows: list[int], prompt_ids: list[list[int]], rows: list[dict],
                            n: int, temperature: float, round_index: int, step: int,
                            times: dict[str, float]) -> list[Rollout]:
        """This process's share of ``prompt_rows`` generated and scored, then everyone's gathered (in order)."""
        c, r = self.config, self.config.rollout
        share = len(prompt_rows) // self.num_processes
        lo, hi = self.process_index * share, (self.process_index + 1) * share
        chunk = r.prompts_per_call or max(share, 1)
        local: list[Rollout] = []
        t0 = time.perf_counter()
        for start in range(lo, hi, chunk):
            idx = list(range(start, min(start + chunk, hi)))
            # each engine call's seed: the run seed, the generation round and the call's first prompt
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=temperature,
                                    top_p=r.top_p if temperature > 0 else 1.0, top_k=r.top_k if temperature > 0 else 0,
                                    n=n, eos_token_id=self.tokenizer.eos_token_id,
                                    seed=(c.run.seed * 1_000_003 + round_index * 7_919 + start) % (2**62))
            ids = [prompt_ids[prompt_rows[i]] for i in idx]
            if self.env is None:
                outs = [(o.prompt_index, o.token_ids, o.logprobs, o.finish_reason, None, None)
                        for o in engine.generate(ids, params)]
            else:  # multi-turn rollouts with the tool environment, many trajectories per engine call
                from posttrain.rollout.multiturn import ToolTurnTemplate, multi_turn_rollout

                if self._tool_template is None:
                    self._tool_template = ToolTurnTemplate(self.tokenizer)
                messages = [rows[prompt_rows[i]][c.data.prompt_column] for i in idx]
                trajs = multi_turn_rollout(engine, self.tokenizer, self.env, ids, messages, params, c.tools.max_turns,
                                           c.tools.max_tokens, self._tool_template)
                outs = [(t.prompt_index, t.completion_ids, t.logprobs, "length" if t.finish_reason == "length" else "stop",
                         t.loss_mask, t.messages) for t in trajs]
            for k, completion, logprobs, finish_reason, mask, messages in outs:
                g = idx[k]
                local.append(Rollout(g, prompt_rows[g], prompt_ids[prompt_rows[g]], completion, logprobs,
                                     finish_reason, {}, None, completion_mask=mask, messages=messages))
        t1 = time.perf_counter()
        errors = 0
        if local:
            batch_rows = [rows[x.prompt_index] for x in local]
            columns = {k: [row.get(k) for row in batch_rows] for k in batch_rows[0]
                       if k not in (c.data.prompt_column, "_where")}
            columns["completion_ids"] = [x.completion_ids for x in local]
            s = self.sampler  # trainer_state (TRL's argument): steps done, steps planned, epochs of prompts
            state = reward_trainer_state(step, c.run.steps, s.epoch + s.cursor / max(s.size, 1))
            result = self.reward_set.score([row[c.data.prompt_column] for row in batch_rows],
                                           [x.messages if x.messages is not None  # the whole trajectory
                                            else self.completion_for_reward(row, x.completion_ids)
                                            for row, x in zip(batch_rows, local, strict=True)],
                                           pool=self.pool, trainer_state=state, **columns)
            result.raise_for_errors(c.rewards.max_error_fraction)
            errors = len(result.errors)
            for name, logged in result.logged_metrics.items():  # the rewards' log_metric calls, averaged
                times[f"log_metric/{name}"] = sum(logged) / len(logged)
            for i, x in enumerate(local):
                x.rewards = {name: values[i] for name, values in result.values.items()}
                x.total = result.total[i]
        t2 = time.perf_counter()
        times["generate"] = times.get("generate", 0.0) + t1 - t0
        times["reward"] = times.get("reward", 0.0) + t2 - t1
        times["reward_errors"] = times.get("reward_errors", 0.0) + errors
        if self.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        return local
