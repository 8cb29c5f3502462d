"""The ``posttrain grpo`` config (``recipes/grpo*.yaml``): small dataclass groups, each field documented where it is
declared; ``model``, ``optim``, ``checkpoint``, ``logging`` and ``run`` subclass the shared groups of
``posttrain.train.config``, and ``lora`` is its ``LoraSettings``.
Cross-group checks live in ``GrpoConfig.__post_init__``, so a bad combination fails before any work starts. This
module must never import torch, a model or an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from posttrain.rewards import RewardsConfig
from posttrain.sampling import SamplingSettings
from posttrain.train.config import (
    CheckpointSettings,
    LoggingSettings,
    LoraSettings,
    ModelSettings,
    OptimizerSettings,
    RunSettings,
)

LossType = Literal["dapo", "grpo", "dr_grpo", "gspo", "gspo_token"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


@dataclass
class LossConfig:
    """The ``loss`` group: which objective and its constants.

    type: ``dapo`` (default), ``grpo``, ``dr_grpo``, ``gspo`` or ``gspo_token`` (see ``posttrain.grpo.loss``).
    epsilon_low: lower clip range, the ratio is clipped at 1 - epsilon_low (None: DAPO's 0.2; 3e-4 for ``gspo`` and
        ``gspo_token``, the GSPO paper's range for its sequence-level ratio, which moves far less than a token's).
    epsilon_high: upper clip range, 1 + epsilon_high (None: DAPO's clip-higher 0.28 for ``dapo``, 4e-4 for
        ``gspo``/``gspo_token``, else equal to epsilon_low, the symmetric clip).
    beta: weight of the k3 KL to the reference model (``model.ref_path``; 0: no reference model is kept or run).
    scale_rewards: divide the group-centred rewards by the group std (None: yes, except for ``dr_grpo``).
    mask_truncated: completions cut at max_new_tokens contribute no loss (DAPO's overlong filtering).
    """

    type: LossType = "dapo"
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float = 0.0
    scale_rewards: bool | None = None
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type must be one of {list(LOSS_TYPES)}, got {self.type!r}")
        if self.epsilon_low is None:  # GSPO's length-normalised sequence ratio moves far less than a token's
            self.epsilon_low = 3e-4 if self.type in ("gspo", "gspo_token") else 0.2
        if self.epsilon_high is None:
            self.epsilon_high = {"dapo": 0.28, "gspo": 4e-4, "gspo_token": 4e-4}.get(self.type, self.epsilon_low)
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"loss.epsilon_low must be in [0, 1) and epsilon_high >= 0, got "
                             f"{self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0:
            raise ValueError(f"loss.beta must be >= 0, got {self.beta}")

    @property
    def uses_std(self) -> bool:
        return self.type != "dr_grpo" if self.scale_rewards is None else self.scale_rewards


@dataclass
class ModelConfig(ModelSettings):
    """The shared ``model`` group (``ModelSettings``, one meaning in every command: ``dtype`` bfloat16 is bf16 autocast
    over float32 master weights) and the KL reference. GRPO trains a checkpoint (``path``; none for a model given to
    ``GrpoTrainer`` directly), never a fresh ``preset``.

    ref_path: the KL reference's checkpoint folder, used when ``loss.beta > 0`` (None: a frozen copy of the
        starting policy; with LoRA, the policy with its adapters disabled). The reference scores tokens with its
        own weights throughout, output layer included, on the policy's device and under the policy's autocast.
    """

    ref_path: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None:
            raise ValueError("model.preset: GRPO trains a checkpoint; give model.path (a fresh model has no policy "
                             "to reinforce)")


@dataclass
class DataConfig:
    """path: a JSONL file of prompts (one JSON object a line), a ``datasets`` folder saved with save_to_disk, or a
        data set on the hub, ``hf:NAME[:CONFIG][@SPLIT]`` (``datasets.load_dataset``; split default ``train``).
    prompt_column: the prompt: a string (used as is) or a list of chat messages (the chat template is applied).
    Every other column reaches the rewards as a keyword list (``answer``, ``tests``, ``ground_truth``...).
    max_prompt_tokens: longest prompt accepted, in tokens.
    long_prompts: what to do with a longer prompt: ``error`` (stop, naming it) or ``drop`` (skip it, counted).
    shuffle: visit prompts in a seeded random order, a new order each epoch.
    """

    path: str = ""
    prompt_column: str = "prompt"
    max_prompt_tokens: int = 512
    long_prompts: Literal["error", "drop"] = "error"
    shuffle: bool = True


@dataclass
class RolloutConfig(SamplingSettings):
    """engine: the rollout engine, by its name in ``posttrain.rollout.registry``: ``native`` (the in-tree models,
        CPU and GPU), ``transformers`` (any causal LM transformers loads, CPU and GPU), ``vllm`` (colocated, GPU,
        ``posttrain[vllm]``) or ``server`` (a ``posttrain vllm-serve`` at ``server_url``, on other GPUs; weights
        pushed by broadcast). None: ``native`` for the in-tree models, ``transformers`` for any other (the family
        is read from the checkpoint's config.json). An engine that cannot run the model's family, or cannot do what
        the run needs (take the weights after each step; with ``async_rollout``, decode a copy of the policy in this
        process), is refused before any work.
    prompts_per_step: groups in one generation batch (all processes together; a multiple of the process count).
    num_generations: G, completions sampled per prompt.
    max_new_tokens: completion length limit (with tools: of each assistant turn; the trajectory's limit, and the
        overlong shaping's L_max, is then ``tools.max_tokens``).
    temperature, top_p, top_k: sampling (RL: top_p 1 and top_k 0, the untruncated distribution). Every engine
        returns each sampled token's log-probability under the distribution it was drawn from: temperature-scaled
        and, with top_p < 1 or top_k > 0, truncated and renormalised (vLLM's ``processed_logprobs``). The loss's
        policy is the untruncated temperature-scaled one, so with truncation the old log-probs are always
        recomputed by the trainer and the sampler's serve only the rollout correction, whose weight
        pi_old / pi_sampler is then exactly the importance weight of the truncation.
    prompts_per_call: at most this many prompts per engine call (0: a process's whole share). Each call's
        sampling seed derives from the run seed, the generation round and its first prompt's global index, so
        rollouts do not depend on the process count when this divides each process's share.
    recompute_old_logprobs: compute the importance ratio's old log-probs with a training forward pass before the
        update (None: yes, except in float32 with an engine that decodes the trainer's own module (native,
        transformers: ``Capabilities.shares_module``), whose sampling log-probs come from the same weights and agree
        with the training path to ~1e-7, so that pass is skipped).
    vllm_gpu_memory_utilization: fraction of the GPU vLLM may take (colocated with training).
    vllm_sleep: put vLLM to sleep (free its KV cache) while training.
    server_url: server mode: the rollout server's address.
    sync_host, sync_port: server mode: where this trainer hosts the weight-sync rendezvous (the server joins it).
    sync_backend: ``nccl`` (GPUs) or ``gloo`` (CPU tensors); None: nccl when CUDA is available.
    sync_timeout_s: server mode: the longest a weight sync (or the server joining) may take before a clear error.
    """

    # the names of posttrain.rollout.registry.ENGINES, here without importing it (this module imports no torch);
    # tests/test_rollout_registry.py checks that they agree
    engine: Literal["native", "transformers", "vllm", "server"] | None = None
    prompts_per_step: int = 8
    num_generations: int = 8
    prompts_per_call: int = 0
    recompute_old_logprobs: bool | None = None
    vllm_gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = True
    server_url: str = "http://127.0.0.1:8000"
    sync_host: str = "127.0.0.1"
    sync_port: int = 51216
    sync_backend: Literal["nccl", "gloo"] | None = None
    sync_timeout_s: float = 120.0


@dataclass
class RolloutCorrectionConfig:
    """Correction for the mismatch between the engine that sampled a completion (pi_sampler: vLLM, a server, a
    bfloat16 or truncated native sampler) and the trainer's recomputed old policy (pi_old), per completion token
    with rho_t = pi_old(y_t) / pi_sampler(y_t) (a hybrid needs it most: Mamba's prefill and decode kernels round
    differently from training's chunked scan).

    enabled: None (auto): on when the engine keeps its own copy of the weights (``vllm``, ``server``: not
        ``Capabilities.shares_module``), the run computes in bfloat16 (``model.dtype`` bfloat16, or auto on a GPU),
        or sampling is truncated (``top_p`` < 1, ``top_k`` > 0); true or false to force it.
    weights: importance weights on the policy term: ``token`` (truncated IS, w_t = min(rho_t, cap)), ``sequence``
        (one weight per completion, min(prod_t rho_t, cap)) or ``none``. Default ``token`` with cap 2 (the
        truncated-IS paper's choice): a per-token weight stays bounded on long completions, where a sequence
        product explodes or vanishes, and no completion is thrown away; TRL's default, ``sequence_mask`` with cap
        3, is ``weights: none, mask: sequence, mask_threshold: 3`` here.
    cap: C, the truncation of the weights (> 0).
    mask: drop whole completions from the loss whose mismatch is too large (MIS): ``sequence`` (prod_t rho_t
        outside [1/mask_threshold, mask_threshold]), ``geometric`` (the geometric mean exp(mean_t log rho_t)
        outside that range: length-independent, so thresholds near 1, e.g. 1.01-1.1, are usual) or ``none``.
    mask_threshold: > 1, see ``mask``.
    Each step logs ``rollout_correction/mismatch_abs_mean`` (mean |log pi_old - log pi_sampler| per token),
    ``rollout_correction/kl`` (k3 estimate of KL(sampler || trainer) per token), ``rollout_correction/weight_mean``,
    ``rollout_correction/capped_frac`` and ``rollout_correction/masked_frac`` (completions masked).
    """

    enabled: bool | None = None
    weights: Literal["token", "sequence", "none"] = "token"
    cap: float = 2.0
    mask: Literal["none", "sequence", "geometric"] = "none"
    mask_threshold: float = 2.0


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling.

    enabled: drop groups whose outcome metric is the same for every completion and generate more.
    metric: label of the reward whose values are the outcome (None: for each sample, the first reward in the list that
        scores it, e.g. the math verifier on math prompts and the tool-call checker on tool prompts); never the shaped
        total, which overlong shaping makes look varied when it is not.
    max_rounds: most generation rounds per step; past it the step trains on the groups it has.
    """

    enabled: bool = True
    metric: str | None = None
    max_rounds: int = 4


@dataclass
class OverlongConfig:
    """DAPO's overlong reward shaping: a penalty falling linearly from 0 at max_new_tokens - buffer tokens to -1 at
    max_new_tokens (the ``overlong`` reward), added with ``weight``. buffer 0: off."""

    buffer: int = 0
    weight: float = 1.0


@dataclass
class OptimConfig(OptimizerSettings):
    """The shared ``optim`` group (``OptimizerSettings``: AdamW, the schedule over optimizer steps, gradient
    clipping) with GRPO's batching.

    mini_batches: optimizer steps per pass over a generation batch (> 1, or the ratio is always 1).
    num_iterations: mu, passes over each generation batch.
    micro_batch_tokens: token budget of one packed row (a longer sequence gets a row of its own).
    """

    lr: float = 1e-6  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decay rates
    # learning-rate schedule after warm-up: cosine decay, warmup-stable-decay, or constant
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    mini_batches: int = 2
    num_iterations: int = 1
    micro_batch_tokens: int = 8192


@dataclass
class EvalConfig:
    """Periodic held-out evaluation: outcome accuracy on prompts never trained on.

    path: JSONL/datasets prompts (same columns as the training data; None: no evaluation).
    every_steps: evaluate every this many steps (0: only at the start and the end).
    max_prompts: evaluate on at most this many prompts.
    num_samples, temperature: completions per prompt and their temperature (0: greedy).
    """

    path: str | None = None
    every_steps: int = 0
    max_prompts: int = 256
    num_samples: int = 1
    temperature: float = 0.0


@dataclass
class ToolsConfig:
    """Multi-turn tool use (posttrain.grpo.tools, posttrain.rollout.multiturn); off while ``names`` is empty.

    names: the tools the model may call: built-ins (``calculator``, ``python``: sandboxed) or ``module:attribute``
        naming a ``Tool`` (or a function returning one). Their JSON schemas are rendered into the prompt by the chat
        template, so prompts must be chat messages.
    max_turns: most assistant turns per trajectory; each turn is limited by ``rollout.max_new_tokens``.
    max_tokens: most tokens after the prompt (the model's and the tool answers'), the trajectory's length limit.
    max_output_chars: a tool's answer is cut to this many characters.
    """

    names: list[str] = field(default_factory=list)
    max_turns: int = 4
    max_tokens: int = 1024
    max_output_chars: int = 2000


@dataclass
class AsyncConfig:
    """Asynchronous, off-policy rollouts (posttrain.rollout.async_rollout).

    enabled: generate the next batches in a background thread, on a copy of the policy that receives the weights
        after every step, while the trainer trains on the current batch.
    max_staleness: how many optimizer steps (generation steps) the policy that generated a batch may be behind the
        policy it trains: 0 is on-policy, 1 is one-step off-policy. The importance ratio always uses the
        log-probabilities of the generating policy; each sample's staleness is logged.
    """

    enabled: bool = False
    max_staleness: int = 1


@dataclass
class CheckpointConfig(CheckpointSettings):
    """The shared ``checkpoint`` group (``CheckpointSettings``) with GRPO's defaults: its own run folder and, unless
    asked for, one checkpoint only, after the last step."""

    output_dir: str = "runs/grpo"  # the run's folder: checkpoints/, final/, metrics.jsonl, rollouts.jsonl
    every_steps: int = 0  # save a resumable checkpoint every N generation steps (0: only at the end)


@dataclass
class RunConfig(RunSettings):
    """The shared ``run`` group (``seed``, ``resume``) with the length of a GRPO run.

    steps: generation steps.
    """

    # where the run starts: null (default) always at step 0; "latest" or a checkpoint folder as in RunSettings.resume
    resume: str | None = None
    steps: int = 100


@dataclass
class LoggingConfig(LoggingSettings):
    """The shared ``logging`` group with GRPO's rollout log.

    rollouts: write every step's samples to ``rollouts.jsonl`` in ``checkpoint.output_dir``, one JSON object per
        completion: ``step``, ``prompt_index``, ``prompt_ids``, ``completion_ids``, ``completion_mask`` (1: the
        policy's tokens, 0: tool answers), ``sampler_logprobs``, ``old_logprobs`` (what the ratio used),
        ``ref_logprobs`` (when ``loss.beta`` > 0), ``rewards`` (per reward), ``reward``, ``advantage``,
        ``truncated``, ``policy_version``. Log-probs are one per completion token (null at masked positions),
        under the temperature-scaled distribution the loss uses; samples that were not trained on (dynamic
        sampling's dropped groups, masked truncations) have null ``old_logprobs``/``ref_logprobs``. A resumed
        run drops the records past its checkpoint, so no step is written twice.
    """

    project: str = "posttrain-grpo"  # tracker project name
    rollouts: bool = False


@dataclass
class GrpoConfig:
    RENAMED: ClassVar[dict[str, str]] = {
        "run.output_dir": "checkpoint.output_dir", "run.save_every": "checkpoint.every_steps",
        "run.checkpoint_verify": "checkpoint.verify", "logging.log_every": "logging.every_steps",
        "eval.every": "eval.every_steps"}

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # with LoRA the KL reference is the adapter-disabled policy
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    async_rollout: AsyncConfig = field(default_factory=AsyncConfig)

    def __post_init__(self) -> None:
        r, o = self.rollout, self.optim
        limit = "tools.max_tokens" if self.tools.names else "rollout.max_new_tokens"  # a completion's length limit
        checks = [
            (r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1"),
            (r.num_generations >= 2, "rollout.num_generations must be >= 2 (advantages compare completions)"),
            (r.temperature > 0, "rollout.temperature must be > 0 (RL samples; greedy groups are uniform)"),
            (r.prompts_per_call >= 0, "rollout.prompts_per_call must be >= 0"),
            (self.dynamic_sampling.max_rounds >= 1, "dynamic_sampling.max_rounds must be >= 1"),
            (0 <= self.overlong.buffer <= self.max_completion_tokens,
             f"overlong.buffer must be in [0, {limit}] (= {self.max_completion_tokens})"),
            (o.mini_batches >= 1 and o.num_iterations >= 1, "optim.mini_batches and optim.num_iterations must be >= 1"),
            (o.mini_batches <= r.prompts_per_step * r.num_generations,
             "optim.mini_batches cannot exceed the completions of a generation batch"),
            (o.micro_batch_tokens >= 1, "optim.micro_batch_tokens must be >= 1"),
            (self.data.max_prompt_tokens >= 1, "data.max_prompt_tokens must be >= 1"),
            (self.run.steps >= 0, "run.steps must be >= 0"),
            (self.eval.num_samples >= 1 and self.eval.every_steps >= 0,
             "eval.num_samples >= 1 and eval.every_steps >= 0"),
            (self.tools.max_turns >= 1, "tools.max_turns must be >= 1"),
            (self.tools.max_tokens >= 1, "tools.max_tokens must be >= 1"),
            (self.tools.max_output_chars >= 1, "tools.max_output_chars must be >= 1"),
            (self.async_rollout.max_staleness >= 0, "async_rollout.max_staleness must be >= 0"),
            (r.sync_timeout_s > 0, "rollout.sync_timeout_s must be > 0"),
            (self.rollout_correction.cap > 0, f"rollout_correction.cap must be > 0, got {self.rollout_correction.cap}"),
            (self.rollout_correction.mask_threshold > 1,
             f"rollout_correction.mask_threshold must be > 1, got {self.rollout_correction.mask_threshold}"),
            (not (r.recompute_old_logprobs is False and r.truncated_distribution),
             ("rollout.recompute_old_logprobs: false cannot hold with top_p < 1 or top_k > 0: the sampler's "
              "log-probs are then of the truncated distribution, not the policy the loss trains")),
            (not (self.async_rollout.enabled and r.truncated_distribution),
             "async_rollout.enabled needs the untruncated distribution (rollout.top_p 1, rollout.top_k 0)"),
            (not (self.async_rollout.enabled and self.rollout_correction.enabled),
             ("rollout_correction.enabled: the asynchronous producer's policy is the sampler itself (its log-probs "
              "are the ratio's old ones), there is no mismatch to correct")),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def max_completion_tokens(self) -> int:
        """A completion's length limit (see ``RolloutConfig.max_new_tokens``)."""
        return self.tools.max_tokens if self.tools.names else self.rollout.max_new_tokens

    def rollout_correction_on(self, engine_shares_module: bool, bfloat16: bool = False) -> bool:
        """Whether the engine/trainer mismatch is corrected (see ``RolloutCorrectionConfig.enabled``), for an engine
        that does (or does not) decode the trainer's own module (``Capabilities.shares_module``); ``bfloat16``: the
        run computes in bfloat16 (its autocast, or a bfloat16 model given directly) whatever ``model.dtype`` says."""
        rc, r = self.rollout_correction, self.rollout
        if rc.enabled is not None:
            return rc.enabled and (rc.weights != "none" or rc.mask != "none")
        auto = not engine_shares_module or bfloat16 or self.model.dtype == "bfloat16" or r.truncated_distribution
        return auto and not self.async_rollout.enabled and (rc.weights != "none" or rc.mask != "none")
