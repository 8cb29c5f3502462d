"""The recipes of ``posttrain dpo`` and ``posttrain pairs``: dataclass groups loaded by ``posttrain.config``.

``DpoConfig`` uses the shared groups (``posttrain.train.config``) and adds ``data``, ``loss`` and ``eval``;
``PairsConfig`` samples answers and turns verdicts into preference rows. Every field is documented where it is
declared. This module only declares; it never loads models or data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from posttrain.sampling import SamplingSettings
from posttrain.train.config import (
    CheckpointSettings,
    LoggingSettings,
    LoraSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
)

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


@dataclass
class PreferenceDataSettings:
    train_files: list[str] = field(default_factory=list)  # JSONL/Parquet/`datasets` rows with prompt/chosen/rejected
    eval_files: list[str] = field(default_factory=list)  # held-out preference rows for the eval metrics
    prompt_field: str = "prompt"  # column holding the prompt (a string or a list of chat turns)
    chosen_field: str = "chosen"  # column holding the preferred completion (string or assistant turns)
    rejected_field: str = "rejected"  # column holding the dispreferred completion
    max_length: int = 512  # longest prompt + completion (tokens); longer completions are cut, keeping the prompt
    packing: bool = True  # padding-free: a micro-batch's chosen and rejected sequences in one row
    shuffle: bool = True  # a new permutation per epoch, seeded by run.seed and the epoch (resumes exactly)
    max_samples: int | None = None  # use only the first N training pairs

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be at least 2, got {self.max_length}")


@dataclass
class PreferenceLossSettings:
    # sigmoid: DPO (Rafailov et al. 2023), with optional label smoothing (conservative DPO);
    # ipo: IPO's squared loss (Azar et al. 2023); simpo: SimPO (Meng et al. 2024), reference-free, length-normalised
    type: str = "sigmoid"
    beta: float = 0.1  # sigmoid/ipo: the KL strength (ipo: tau); simpo: the reward scale (paper: 2.0-2.5)
    label_smoothing: float = 0.0  # sigmoid: assumed probability that a label is flipped, in [0, 0.5)
    gamma: float = 0.5  # simpo: the target reward margin gamma, in reward units (TRL's simpo_gamma)
    # RPO (Pang et al. 2024): add nll_weight times the chosen completion's per-token negative log-likelihood, so
    # the chosen answers' probabilities are held up while the margin grows (TRL's rpo_alpha; 0: off)
    nll_weight: float = 0.0
    # where the reference log-probs come from: precomputed once before training (stored beside the run, resumable),
    # or on_the_fly in every micro-batch; simpo uses none
    reference: Literal["precomputed", "on_the_fly"] = "precomputed"

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type: unknown loss {self.type!r}; known: {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.type != "sigmoid":
            raise ValueError("loss.label_smoothing applies to the sigmoid loss only")
        if not self.nll_weight >= 0:
            raise ValueError(f"loss.nll_weight must be >= 0, got {self.nll_weight}")

    @property
    def needs_reference(self) -> bool:
        return self.type != "simpo"


@dataclass
class PreferenceEvalSettings:
    every_steps: int = 0  # held-out metrics every N optimizer steps (0: only before training and at the end)
    batch_size: int = 16  # pairs per evaluation forward pass

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.batch_size < 1:
            raise ValueError("eval.every_steps must be >= 0 and eval.batch_size >= 1")


@dataclass
class DpoConfig:
    RENAMED: ClassVar[dict[str, str]] = {"seed": "run.seed", "checkpoint.resume": "run.resume"}

    model: ModelSettings = field(default_factory=lambda: ModelSettings(path="runs/sft_tiny/final"))
    lora: LoraSettings = field(default_factory=LoraSettings)  # with LoRA the reference is the adapter-disabled model
    data: PreferenceDataSettings = field(default_factory=PreferenceDataSettings)
    loss: PreferenceLossSettings = field(default_factory=PreferenceLossSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-7, per_device_batch_size=4))
    checkpoint: CheckpointSettings = field(default_factory=lambda: CheckpointSettings(output_dir="runs/dpo"))
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    eval: PreferenceEvalSettings = field(default_factory=PreferenceEvalSettings)
    run: RunSettings = field(default_factory=RunSettings)


# -- posttrain pairs ------------------------------------------------------------------------------------------------
@dataclass
class PairSamplingSettings(SamplingSettings):
    model: str = "runs/sft_tiny/final"  # the checkpoint that answers (weights, config.json, tokenizer)
    # the rollout engine that samples the answers, by its name in posttrain.rollout.registry: native (the in-tree
    # models), transformers (any causal LM transformers loads) or vllm (GPU); None: native for the in-tree models,
    # transformers for any other (the family is read from the checkpoint's config.json)
    engine: Literal["native", "transformers", "vllm"] | None = None
    tokenizer: str | None = None  # default: the model folder
    num_samples: int = 4  # answers sampled per prompt
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 2:
            raise ValueError(f"sampling.num_samples must be at least 2 to make a pair, got {self.num_samples}")


@dataclass
class PairVerdictSettings:
    # judge: pairwise LLM judge in both orders (posttrain filter's judge); reward: a verifiable reward's scores
    source: Literal["judge", "reward"] = "judge"
    # the judge section of a `posttrain filter` config (backend, sampling, rubric, ...); mode is set to pairwise
    judge: dict[str, Any] = field(default_factory=dict)
    judge_cache: str | None = None  # sqlite cache of verdicts; default <output>.judge_cache.sqlite
    reward: str = "math"  # source reward: a name in posttrain.rewards or a module:function path
    reward_options: dict[str, Any] = field(default_factory=dict)  # passed to posttrain.rewards.get
    chosen_min: float = 1.0  # reward: a completion scoring at least this is verified (chosen)
    rejected_max: float = 0.0  # ... one scoring at most this is refuted (rejected); None (unscorable) is neither
    max_pairs_per_prompt: int = 1  # keep at most this many pairs per prompt (distinct answers, first found first)
    # on_policy pairing: the data set's reference answer written as the SFT targets write it, a Python format string
    # over the prompt row's columns ("{answer}", "The answer is {answer}."); it is the chosen answer of a prompt
    # whose greedy answer is refuted and none of whose samples is verified (and only if the reward verifies it).
    # None: such a prompt gives no pair
    reference_answer: str | None = None


@dataclass
class PairsConfig:
    prompts_file: str = ""  # JSONL/Parquet/`datasets` rows with the prompt (and the reward's columns)
    prompt_field: str = "prompt"  # column with the prompt: a string or a list of chat turns
    output: str = "runs/pairs/pairs.jsonl"  # the preference rows (prompt/chosen/rejected/provenance) + manifest
    max_prompts: int | None = None
    # how a pair is made:
    # - samples: two of the sampled answers, the one the judge prefers in both orders (verdict.source: judge) or a
    #   verified one against a refuted one (verdict.source: reward);
    # - on_policy (verdict.source: reward): the model's own greedy answer, when the reward refutes it, is rejected;
    #   a sampled answer the reward verifies is chosen, or, when none is, verdict.reference_answer. Every prompt the
    #   model gets wrong gives a pair when a chosen answer exists; the provenance says where each chosen came from
    pairing: Literal["samples", "on_policy"] = "samples"
    sampling: PairSamplingSettings = field(default_factory=PairSamplingSettings)
    verdict: PairVerdictSettings = field(default_factory=PairVerdictSettings)

    def __post_init__(self) -> None:
        if self.pairing == "on_policy" and self.verdict.source != "reward":
            raise ValueError("pairing: on_policy needs verdict.source: reward (a reward refutes the greedy answer "
                             f"and verifies the chosen one), got verdict.source: {self.verdict.source}")
