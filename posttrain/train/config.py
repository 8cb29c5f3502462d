"""The config family's shared groups, and the recipe of ``posttrain pretrain`` and ``posttrain sft``.

The groups every trainer shares, with one meaning per field across ``pretrain``, ``sft``, ``dpo`` and ``grpo``:
``model``, ``lora``, ``optim`` (``OptimizerSettings``; each command adds how it batches), ``checkpoint``,
``logging`` and ``run``. A command may subclass a group to add its own fields or change a default, never to give a
shared field another meaning. SFT and pre-training add ``data`` and optional ``stages`` (staged context extension).
Every field is documented where it is declared. This module only declares; it never loads models or data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass
class ModelSettings:
    path: str | None = None  # HF-format checkpoint folder to start from (in-tree hybrid or any transformers causal LM)
    preset: str | None = None  # or build a fresh in-tree hybrid from a preset ("tiny", ...) — pre-training from scratch
    tokenizer: str | None = None  # tokenizer folder; default: the model folder
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    moe_aux_loss: bool = True  # add the router load-balancing loss (coefficient: the model's router_aux_loss_coef)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.path (a checkpoint) or model.preset (a fresh model)")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a fresh model has no tokenizer of its own)")


@dataclass
class LoraSettings:
    enabled: bool = False  # train low-rank adapters instead of all weights (peft); export merges them
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling numerator (update scaled by alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input
    # module names to adapt; null: the model family's own (the hybrid: the Mamba-2 in/out and attention
    # projections; any other model: every linear layer of its decoder blocks, e.g. q/k/v/o_proj and
    # gate/up/down_proj for Llama and Qwen2; posttrain.families.default_lora_targets)
    target_modules: list[str] | None = None


@dataclass
class DataSettings:
    # JSONL/JSON-lines, Parquet files, `datasets` folders, or data sets on the hub: hf:NAME[:CONFIG][@SPLIT]
    train_files: list[str] = field(default_factory=list)
    # row format: "messages" (chat, tool calls allowed), "prompt_completion", "text" (pre-training), "auto": by fields
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    text_field: str = "text"  # the field holding plain text for format "text"
    prompt_field: str = "prompt"  # prompt/completion rows: read the prompt from this field (GSM8K: "question")
    completion_field: str = "completion"  # ... and the completion from this one (GSM8K: "answer")
    max_length: int = 1024  # longest sequence (tokens); with packing, the length of one packed bin
    packing: bool = True  # padding-free: bins of whole sequences, flattened into one row per micro-batch
    assistant_only_loss: bool = True  # chat rows: loss on the template's {% generation %} tokens only
    completion_only_loss: bool = True  # prompt/completion rows: loss on the completion only
    truncate: bool = True  # cut sequences longer than max_length (pre-training splits them instead); false: error
    shuffle: bool = True  # a new permutation per epoch, seeded by run.seed and the epoch (resumes exactly)
    max_samples: int | None = None  # use only the first N rows (after reading, before packing)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be at least 2, got {self.max_length}")


@dataclass
class OptimizerSettings:
    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator term
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (> 0); null: no clipping
    # learning-rate schedule after warm-up: cosine decay, warmup-stable-decay, or constant
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to lr
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    decay_fraction: float = 0.1  # wsd: the share of steps spent decaying

    def __post_init__(self) -> None:
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optim.max_grad_norm must be > 0, or null for no clipping, got {self.max_grad_norm}")
        if self.lr < 0 or self.warmup_steps < 0:
            raise ValueError("optim.lr and optim.warmup_steps must be >= 0")


@dataclass
class OptimSettings(OptimizerSettings):
    per_device_batch_size: int = 8  # sequences (or packed bins) per process per micro-batch
    grad_accumulation_steps: int = 1  # micro-batches per optimizer step
    epochs: int = 1  # passes over the data (when max_steps is not set)
    max_steps: int | None = None  # optimizer steps; default: epochs over the data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_device_batch_size < 1 or self.grad_accumulation_steps < 1:
            raise ValueError("optim.per_device_batch_size and optim.grad_accumulation_steps must be at least 1")


@dataclass
class CheckpointSettings:
    output_dir: str = "runs/sft"  # the run's folder: checkpoints/, final/, metrics.jsonl, config.yaml
    every_steps: int = 100  # save a resumable checkpoint every N optimizer steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept
    # how a checkpoint is checked against its manifest before resuming: "full" (size and sha256 of every file)
    # or "size" (sizes only, for very large optimizer states: catches truncated and missing files, NOT a byte
    # changed in place)
    verify: Literal["full", "size"] = "full"

    def __post_init__(self) -> None:
        if self.verify not in ("full", "size"):
            raise ValueError(f"checkpoint.verify must be 'full' or 'size', got {self.verify!r}")
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class LoggingSettings:
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, trackio, wandb, ...
    project: str = "posttrain"  # tracker project name
    every_steps: int = 1  # write metrics (metrics.jsonl and the trackers) every N steps, and at the last
    progress: bool = True  # show a progress bar (rich)
    record_samples: bool = False  # write each step's sample ids to metrics.jsonl (audits: nothing seen twice)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"logging.every_steps must be >= 1, got {self.every_steps}")


@dataclass
class RunSettings:
    seed: int = 0  # every random choice of the run: model initialisation, data order, sampling
    # where the run starts: "latest" continues from the newest valid checkpoint in checkpoint.output_dir (one that
    # fails verification is named in a warning, set aside as step-N.rejected, and the one before it is used), or
    # starts at step 0 when there is none, so one command starts and resumes a job; a checkpoint folder: exactly
    # that checkpoint, an error if it is not valid; null: always start at step 0
    resume: str | None = "latest"

    def __post_init__(self) -> None:
        if self.resume is not None and not self.resume.strip():
            raise ValueError("run.resume must be null, latest or a checkpoint folder, got ''")


@dataclass
class StageSettings:
    max_length: int = 1024  # sequence length of this stage
    max_steps: int = 100  # optimizer steps of this stage
    lr: float | None = None  # peak lr; default optim.lr
    merge_weight: float = 0.5  # weight of the stage's result in the merge with the stage's starting model
    merge_method: Literal["linear", "slerp"] = "linear"


@dataclass
class TrainConfig:
    RENAMED: ClassVar[dict[str, str]] = {"seed": "run.seed", "checkpoint.resume": "run.resume"}

    model: ModelSettings = field(default_factory=lambda: ModelSettings(preset="tiny", tokenizer="tokenizer"))
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    stages: list[StageSettings] = field(default_factory=list)  # staged context extension (pretrain only)
