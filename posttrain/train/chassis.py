"""The training chassis: what every trainer here (pretrain, SFT, DPO, GRPO, and whatever comes next) shares.

A trainer builds one ``Chassis`` from the shared config groups (``optim``, ``checkpoint``, ``logging``) and keeps
only what is its own: how it draws its batches and computes its loss, its metrics, its evaluation. The chassis
holds, written once: the accelerator and its trackers, the run folder, the AdamW optimizer and its schedule, the
optimizer step with clipping and the non-finite guard (a step whose loss or gradient norm is not finite on any
process leaves the weights, optimizer state and schedule as they were; the caller decides whether to go on),
checkpoints (save, verify, resume; a resumed run's logs are cut back to its checkpoint, a run from step 0 starts
them afresh), ``metrics.jsonl`` and the trackers, the progress bar, and the loop (``run``).

This module never reads data, builds a model or computes a loss.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.train.checkpointing import CheckpointManager
from posttrain.train.config import CheckpointSettings, LoggingSettings, OptimizerSettings
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


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys with plain values, as trackers take it."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) on the main process, plus the accelerate trackers.
    ``extra`` names other JSON-lines files of the run folder whose records carry a ``step`` (GRPO's rollouts) and
    are cut back with it."""

    def __init__(self, accelerator, path: str | os.PathLike, extra: Sequence[str] = ()):
        self.accelerator = accelerator
        self.path = Path(path)
        self.extra = [self.path.with_name(name) for name in extra]

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (what a killed run logged past its last checkpoint; every
        record, for ``step`` -1); a line cut by the kill is dropped too."""
        if not self.accelerator.is_main_process:
            return
        for path in [self.path, *self.extra]:
            if not path.is_file():
                continue
            keep = []
            with path.open() as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        continue
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
                f.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)


class Chassis:
    """The shared machinery of one training run. ``stage`` names the progress bar;
    ``logs`` are the run folder's other step-keyed JSON-lines files (cut back on resume like metrics.jsonl)."""

    def __init__(self, optim: OptimizerSettings, checkpoint: CheckpointSettings, logging: LoggingSettings, *,
                 dtype: str = "auto", accelerator=None, stage: str = "train", logs: Sequence[str] = ()):
        self.optim, self.checkpoint, self.logging, self.stage = optim, checkpoint, logging, stage
        self.output_dir = Path(checkpoint.output_dir)
        self.accelerator = accelerator or build_accelerator(logging, self.output_dir, dtype)
        self.metrics = MetricsLog(self.accelerator, self.output_dir / "metrics.jsonl", logs)
        self.model = self.optimizer = self.scheduler = None
        self.checkpoints: CheckpointManager | None = None
        self._resumed: list[dict[str, Any] | None] = []  # the state resume() restored, once

    def prepare(self, model, total_steps: int, *stateful) -> Any:
        """AdamW over the trainable parameters and its schedule over ``total_steps`` optimizer steps, the model and
        optimizer prepared by accelerate, a checkpoint manager saving them with the schedule and ``stateful``
        (anything with ``state_dict``/``load_state_dict``). Returns the prepared model. A schedule that cannot fit
        the run (a warmup longer than it) is a TrainingError naming ``optim``."""
        o = self.optim
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        try:
            scheduler = build_scheduler(optimizer, o.schedule, total_steps, o.warmup_steps, o.min_lr_ratio,
                                        o.decay_fraction)
        except ValueError as exc:
            raise TrainingError(f"optim: {exc}") from None
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.checkpoints = CheckpointManager(self.accelerator, self.output_dir / "checkpoints",
                                             self.checkpoint.keep_last, self.checkpoint.verify)
        self.checkpoints.register(scheduler, *stateful)
        return self.model

    # -- checkpoints and logs -----------------------------------------------------------------------------------
    def resume(self, where: str | None, check: Callable[[dict[str, Any]], None] | None = None
               ) -> dict[str, Any] | None:
        """Restore the checkpoint ``run.resume`` names (``where``: None, ``latest`` or a path; see
        ``CheckpointManager.resume``) and return its saved state, or None for a start at step 0. ``check(state)``
        may refuse the checkpoint (raising) before anything is loaded or written; then the logs are cut back to the
        checkpoint's step, or emptied for a start at step 0. Done once: a later call returns the same state."""
        if self._resumed:
            return self._resumed[0]
        state = self.checkpoints.resume(where, check) if where is not None else None
        self.metrics.truncate_after(int(state["step"]) if state is not None else -1)
        if state is not None:
            self.accelerator.print(f"resuming from {self.checkpoints.resumed_from} at step {int(state['step'])}")
        self._resumed.append(state)
        return state

    # -- one optimizer step -------------------------------------------------------------------------------------
    def optimizer_step(self, loss_finite: bool = True) -> float | None:
        """Clip the gradients (``optim.max_grad_norm``; null: their norm is measured, not changed), then step the
        optimizer and the schedule, unless the loss (``loss_finite``) or the gradient norm is not finite on some
        process: then nothing moves. The gradients are cleared either way. Returns the gradient norm, or None for
        a skipped step."""
        acc = self.accelerator
        limit = self.optim.max_grad_norm if self.optim.max_grad_norm is not None else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), limit))
        ok = torch.tensor([float(loss_finite and math.isfinite(grad_norm))], device=acc.device)
        if acc.num_processes > 1:
            ok = acc.reduce(ok, reduction="sum") / acc.num_processes
        finite = bool(ok.item() == 1.0)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if finite else None

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, start: int, total: int, step: Callable[[int], dict[str, Any]],
            state: Callable[[int], dict[str, Any]], *, run_config: dict[str, Any] | None = None,
            before_log: Callable[[int, dict[str, Any]], None] | None = None,
            after_step: Callable[[int, dict[str, Any]], None] | None = None,
            figures: Callable[[dict[str, Any]], dict[str, str]] | None = None,
            at_start: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Steps ``start`` .. ``total`` - 1. ``step(i)`` takes step i and returns its metrics; they are logged
        (after ``before_log(done, metrics)`` adds to them) every ``logging.every_steps`` steps and at the last,
        ``after_step(done, metrics)`` sees every step's, a checkpoint of ``state(done)`` is saved every
        ``checkpoint.every_steps`` steps and after the last, and the progress bar shows ``figures(metrics)``.
        ``at_start()`` gives metrics logged as step ``start`` once the trackers are started, before the first step
        (an evaluation of the starting weights), even when there is no step to take. Returns the last step's
        metrics."""
        from posttrain.progress import StageProgress

        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.logging.report_to:
            acc.init_trackers(self.logging.project, config=flat_config(run_config or {}))
        every, log_every = self.checkpoint.every_steps, self.logging.every_steps
        metrics: dict[str, Any] = {}
        progress = StageProgress(self.stage, total, start, enabled=self.logging.progress and acc.is_main_process)
        try:
            with progress:
                if at_start is not None:
                    self.metrics.log(start, at_start())
                for i in range(start, total):
                    metrics = step(i)
                    done = i + 1
                    if done % log_every == 0 or done == total:
                        if before_log is not None:
                            before_log(done, metrics)
                        self.metrics.log(done, metrics)
                    if after_step is not None:
                        after_step(done, metrics)
                    progress.advance(1, **(figures(metrics) if figures is not None else {}))
                    if (every and done % every == 0) or done == total:
                        self.checkpoints.save(done, state(done))
        finally:
            for tracker in acc.trackers:  # not accelerator.end_training(): that also ends the process group
                tracker.finish()
        return metrics
