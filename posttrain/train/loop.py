"""The training loop shared by ``posttrain pretrain`` and ``posttrain sft``, and the pieces GRPO reuses.

Reusable components (each small, each usable alone):

- ``build_accelerator(logging, output_dir, dtype)``: an ``accelerate.Accelerator`` with the trackers of
  ``report_to`` (a clear error when a tracker's package is missing) and bf16 autocast on GPU / fp32 on CPU.
- ``build_optimizer(params, optim)``: AdamW with the recipe's settings.
- ``global_token_count(accelerator, local)``: target tokens of the global batch, summed over processes.
- ``masked_nll_sum(model, batch, moe_aux)``: the summed next-token NLL of a micro-batch, its target count and the
  MoE load-balancing loss, through the model's fused log-prob loss (full logits never materialise).
- ``MetricsLog``: metrics.jsonl on the main process, cut back to the resumed step after a restart, and the
  accelerate trackers.

``Trainer`` wires them: the ``BatchPlan`` draws items, each process collates its micro-batches, the loss of a
step is sum(NLL over every target token of the global batch) / (global target count), so the result does not
depend on how the global batch is split over processes and accumulation steps. Gradients are averaged by DDP/FSDP
over processes, hence each process scales its sum by ``world_size / global_count``. Checkpoints go through
``CheckpointManager``; resuming restores everything and continues at the saved step. The loop never reads files:
it gets tokenized items from ``posttrain.train.data``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.train.checkpointing import CheckpointManager
from posttrain.train.config import LoggingSettings, OptimSettings, TrainConfig
from posttrain.train.data import IGNORE, BatchPlan, Segment
from posttrain.train.schedules import build_scheduler

_TRACKER_PACKAGES = {"tensorboard": ("is_tensorboard_available", "tensorboard"),
                     "wandb": ("is_wandb_available", "wandb"), "trackio": ("is_trackio_available", "trackio"),
                     "mlflow": ("is_mlflow_available", "mlflow"), "comet_ml": ("is_comet_ml_available", "comet_ml")}


class TrainingError(RuntimeError):
    """A training run that cannot start or continue (bad tracker, mismatched resume, non-finite loss)."""


def check_trackers(report_to: Sequence[str]) -> list[str]:
    import accelerate.utils as au
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in report_to:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise TrainingError(f"logging.report_to: unknown tracker {name!r}; accelerate knows "
                                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        check, package = _TRACKER_PACKAGES.get(name, (None, name))
        if check is not None and not getattr(au, check)():
            raise TrainingError(f"logging.report_to asks for {name!r} but the {package!r} package is not installed: "
                                f"pip install {package} (or remove it from report_to)")
    return list(report_to)


def build_accelerator(logging: LoggingSettings, output_dir: str | os.PathLike, dtype: str = "auto"):
    from accelerate import Accelerator

    trackers = check_trackers(logging.report_to)
    on_gpu = torch.cuda.is_available()
    # bf16 autocast over float32 master weights on GPU (or when asked for); plain float32 on CPU
    mixed = "bf16" if dtype == "bfloat16" or (dtype == "auto" and on_gpu) else "no"
    # cpu=True on a machine without CUDA: under torchrun (accelerate launch) that selects gloo and MULTI_CPU
    return Accelerator(log_with=trackers or None, project_dir=str(output_dir), mixed_precision=mixed,
                       cpu=not on_gpu)


def build_optimizer(params, optim: OptimSettings) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters")
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def global_token_count(accelerator, local: int | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(local, dtype=torch.float64 if accelerator.device.type == "cpu" else torch.float32,
                        device=accelerator.device)
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t


def masked_nll_sum(model, batch: dict[str, torch.Tensor], moe_aux: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sum of next-token NLL over target tokens, number of targets, MoE aux loss or 0) for one micro-batch."""
    labels = batch["labels"]
    n = int((labels[:, 1:] != IGNORE).sum())
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    from posttrain.families import is_in_tree

    if is_in_tree(model):
        out = model(**kwargs, labels=labels, return_logits=False, output_router_logits=moe_aux)
    else:  # a transformers model: no cache, so a packed row's restarting position_ids mask its sequences apart
        out = model(**kwargs, labels=labels, use_cache=False, **({"output_router_logits": True} if moe_aux else {}))
    aux = getattr(out, "aux_loss", None)
    mean = out.loss
    if aux is not None:
        coef = _model_config(model).router_aux_loss_coef
        mean = mean - coef * aux  # the model adds coef * aux to its loss; keep the two apart
    else:
        aux = torch.zeros((), device=mean.device)
    return mean * n, n, aux


def _model_config(model):
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.config


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) on the main process, plus the accelerate trackers."""

    def __init__(self, accelerator, path: str | os.PathLike):
        self.accelerator = accelerator
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (what a killed run logged past its last checkpoint)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill: nothing after it is whole
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
                f.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)


def prepare_training(accelerator, model, optim: OptimSettings, total_steps: int, output_dir: Path, keep_last: int,
                     verify: str = "full"):
    """The optimizer and its schedule, the model and optimizer prepared by accelerate, a checkpoint manager that also
    saves the schedule (``verify``: how it checks a checkpoint before resuming, ``checkpoint.verify``), and the
    metrics log: what every trainer here sets up the same way. A schedule that cannot fit the run (a warmup longer
    than it) is a TrainingError naming ``optim``."""
    optimizer = build_optimizer(model.parameters(), optim)
    try:
        scheduler = build_scheduler(optimizer, optim.schedule, total_steps, optim.warmup_steps, optim.min_lr_ratio,
                                    optim.decay_fraction)
    except ValueError as exc:
        raise TrainingError(f"optim: {exc}") from None
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints = CheckpointManager(accelerator, Path(output_dir) / "checkpoints", keep_last, verify)
    checkpoints.register(scheduler)
    return model, optimizer, scheduler, checkpoints, MetricsLog(accelerator, Path(output_dir) / "metrics.jsonl")


def resume_step(accelerator, checkpoints, plan: BatchPlan, unit: str, where: bool | str = "latest") -> int:
    """The step a resumed run starts at: that of the checkpoint ``where`` names (``checkpoint.resume``: the latest
    valid one, or a path; see ``CheckpointManager.resume``), or 0 when there is none. A checkpoint written for other
    data or another global batch is an error (its step would index other samples)."""
    state = checkpoints.resume(where)
    if state is None:
        return 0
    if state.get("n_items") != plan.n_items or state.get("global_batch") != plan.global_batch:
        raise TrainingError(
            f"cannot resume from {checkpoints.resumed_from}: it was written for {state.get('n_items')} {unit} in "
            f"global batches of {state.get('global_batch')}, this run has {plan.n_items} in batches of "
            f"{plan.global_batch}; use another checkpoint.output_dir or checkpoint.resume: false")
    start = int(state["step"])
    accelerator.print(f"resuming from {checkpoints.resumed_from} at step {start}")
    return start


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    metrics_path: Path
    model: Any  # the trained (unwrapped) model


class Trainer:
    """Trains ``model`` on ``items`` (lists of ``Segment``) under ``accelerator``.

    ``items`` are drawn by a ``BatchPlan``; ``packed`` picks ``collate_packed`` (one flat row per micro-batch) or
    ``collate_padded``. Call ``train()``; it resumes as ``checkpoint.resume`` says (by default from the newest valid
    checkpoint in ``output_dir/checkpoints``, if any), and returns the unwrapped model after the last step.
    """

    def __init__(self, config: TrainConfig, model, items: Sequence[Sequence[Segment]], *, packed: bool,
                 pad_token_id: int, accelerator=None, run_config: dict[str, Any] | None = None,
                 max_length: int | None = None, max_steps: int | None = None,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None):
        self.config = config
        self.items = list(items)
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.max_length = max_length or config.data.max_length
        self.output_dir = Path(config.checkpoint.output_dir)
        self.accelerator = accelerator or build_accelerator(config.logging, self.output_dir, config.model.dtype)
        self.run_config = run_config or {}
        self.on_step = on_step
        acc = self.accelerator
        o = config.optim
        if acc.distributed_type.name == "DEEPSPEED" and o.grad_accumulation_steps > 1:
            # accelerate's DeepSpeed backward also steps the engine, so micro-batches would each take a step
            raise TrainingError("optim.grad_accumulation_steps > 1 is not supported under DeepSpeed yet; "
                                "raise per_device_batch_size or use FSDP2 (recipes/accelerate/fsdp2_8gpu.yaml)")
        self.plan = BatchPlan(len(self.items), o.per_device_batch_size, o.grad_accumulation_steps,
                              acc.num_processes, seed=config.seed, shuffle=config.data.shuffle)
        self.total_steps = max_steps or o.max_steps or o.epochs * self.plan.steps_per_epoch
        if config.model.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.moe_aux = bool(config.model.moe_aux_loss and getattr(_model_config(model), "num_local_experts", 0))
        self.model, self.optimizer, self.scheduler, self.checkpoints, self.metrics = prepare_training(
            acc, model, o, self.total_steps, self.output_dir, config.checkpoint.keep_last, config.checkpoint.verify)
        self._start: int | None = None  # the step resume() found

    # -- one optimizer step -------------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[tuple[dict[str, torch.Tensor], list[Sequence[Segment]]]]:
        from posttrain.train.data import collate_packed, collate_padded

        acc = self.accelerator
        out = []
        for m in range(self.plan.accum):
            chosen = [self.items[i] for i in self.plan.micro_indices(step, acc.process_index, m)]
            batch = collate_packed(chosen) if self.packed else collate_padded(chosen, self.pad_token_id)
            out.append(({k: v.to(acc.device) for k, v in batch.items()}, chosen))
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        acc = self.accelerator
        self.model.train()
        micro = self._micro_batches(step)
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b, _ in micro)
        n_global = global_token_count(acc, local_targets)
        if float(n_global) == 0:
            raise TrainingError(f"step {step + 1}: the global batch has no target tokens")
        scale = acc.num_processes / n_global.to(torch.float32)
        nll_total = torch.zeros((), dtype=torch.float64, device=acc.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=acc.device)
        tokens = padded_cells = 0
        for m, (batch, chosen) in enumerate(micro):
            ctx = acc.no_sync(self.model) if m < len(micro) - 1 else _nullcontext()
            with ctx:
                with acc.autocast():
                    nll_sum, _, aux = masked_nll_sum(self.model, batch, self.moe_aux)
                loss = nll_sum.float() * scale
                if self.moe_aux:
                    loss = loss + _model_config(self.model).router_aux_loss_coef * aux / len(micro)
                acc.backward(loss)
            nll_total += nll_sum.detach().double()
            aux_total += aux.detach().double()
            tokens += sum(len(s) for item in chosen for s in item)
            padded_cells += (len(chosen) * self.max_length if self.packed else batch["input_ids"].numel())
        grad_norm = None
        if self.config.optim.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.stack([nll_total, aux_total, torch.tensor(float(tokens), dtype=torch.float64,
                            device=acc.device), torch.tensor(float(padded_cells), dtype=torch.float64,
                            device=acc.device)])
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        loss = float(sums[0] / n_global.double())
        if not math.isfinite(loss):
            raise TrainingError(f"step {step + 1}: the loss is {loss}")
        metrics: dict[str, Any] = {
            "loss": loss, "lr": self.scheduler.get_last_lr()[0], "target_tokens": int(n_global),
            "tokens": int(sums[2]), "packing_efficiency": float(sums[2] / sums[3]),
            "epoch": self.plan.epoch_of(step),
        }
        if self.moe_aux:
            metrics["aux_loss"] = float(sums[1]) / (len(micro) * acc.num_processes)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    # -- the run ------------------------------------------------------------------------------------------------
    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {"epoch": self.plan.epoch_of(step), "batch_in_epoch": step % self.plan.steps_per_epoch,
                "global_batch": self.plan.global_batch, "n_items": self.plan.n_items,
                "world_size": self.accelerator.num_processes, "total_steps": self.total_steps}

    def resume(self) -> int:
        """Restore the checkpoint ``checkpoint.resume`` names (once) and return the step training starts at; a bad
        checkpoint is a ``CheckpointError`` before anything is written. ``train()`` calls it if nobody did."""
        if self._start is None:
            self._start = resume_step(self.accelerator, self.checkpoints, self.plan, "items",
                                      self.config.checkpoint.resume)
        return self._start

    def train(self) -> TrainResult:
        acc = self.accelerator
        start = self.resume()
        self.metrics.truncate_after(start)
        if self.config.logging.report_to:
            acc.init_trackers(self.config.logging.project, config=_flat(self.run_config))
        progress = _Progress(acc.is_main_process and self.config.logging.progress, self.total_steps, start)
        loss = float("nan")
        every = self.config.checkpoint.every_steps
        t_last, tokens_since = time.perf_counter(), 0
        with progress:
            for step in range(start, self.total_steps):
                metrics = self.train_step(step)
                done = step + 1
                loss = metrics["loss"]
                tokens_since += metrics["tokens"]
                if done % self.config.logging.every_steps == 0 or done == self.total_steps:
                    now = time.perf_counter()
                    metrics["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    if self.config.logging.record_samples:
                        metrics["samples"] = sorted(s.sample_id for i in self.plan.global_indices(step)
                                                    for s in self.items[i])
                    self.metrics.log(done, metrics)
                if self.on_step is not None:
                    self.on_step(done, metrics)
                progress.advance(loss, metrics.get("tokens_per_s"))
                if every and done % every == 0 and done < self.total_steps:
                    self.checkpoints.save(done, self._trainer_state(done))
        if self.total_steps > start:
            self.checkpoints.save(self.total_steps, self._trainer_state(self.total_steps))
        for tracker in acc.trackers:  # not accelerator.end_training(): that also ends the process group
            tracker.finish()
        return TrainResult(self.total_steps, loss, self.metrics.path, acc.unwrap_model(self.model))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Progress:
    """The training chassis' progress (``posttrain.progress.StageProgress``): loss and tokens/s beside the steps."""

    def __init__(self, enabled: bool, total: int, start: int, stage: str = "train"):
        from posttrain.progress import StageProgress

        self.display = StageProgress(stage, total, start, enabled=enabled)

    def __enter__(self):
        self.display.__enter__()
        return self

    def __exit__(self, *exc):
        return self.display.__exit__(*exc)

    def advance(self, loss: float, tokens_per_s: float | None) -> None:
        figures = {"loss": f"{loss:.4f}"}
        if tokens_per_s:
            figures["tok/s"] = f"{tokens_per_s:,.0f}"
        self.display.advance(1, **figures)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
