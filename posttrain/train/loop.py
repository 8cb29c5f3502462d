"""SFT and pre-training on the chassis: next-token loss over target tokens, summed over the global batch.

``PlanTrainer``: what SFT and DPO add to the chassis (``posttrain.train.chassis``): a ``BatchPlan``, resuming on
it, the loop. ``Trainer``: each process collates its micro-batches of the plan's items, and a step's loss is the NLL
summed over every target token of the global batch / the global target count (``global_token_count``), so it does
not depend on how the batch is split over processes and accumulation steps; each process scales its sum by
``world_size / global_count`` since DDP/FSDP average gradients. ``masked_nll_sum`` goes through the model's fused
log-prob loss (full logits never materialise). A step whose loss or gradient is not finite stops the run with a
``TrainingError``, the weights as they were. The loop never reads files: it gets tokenized items from
``posttrain.train.data``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.families import core_model, is_in_tree, router_loss_on
from posttrain.train.chassis import Chassis, TrainingError
from posttrain.train.config import TrainConfig
from posttrain.train.data import IGNORE, BatchPlan, Segment, collate_packed, collate_padded


def global_token_count(accelerator, local: int | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(local, dtype=torch.float64 if accelerator.device.type == "cpu" else torch.float32,
                        device=accelerator.device)
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t


def masked_nll_sum(model, batch: dict[str, torch.Tensor], moe_aux: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sum of next-token NLL over target tokens, number of targets, MoE aux loss or 0) for one micro-batch."""
    labels = batch["labels"]
    n = int((labels[:, 1:] != IGNORE).sum())
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if is_in_tree(model):
        out = model(**kwargs, labels=labels, return_logits=False, output_router_logits=moe_aux)
    else:  # a transformers model: no cache, so a packed row's restarting position_ids mask its sequences apart
        out = model(**kwargs, labels=labels, use_cache=False, **({"output_router_logits": True} if moe_aux else {}))
    aux = getattr(out, "aux_loss", None)
    mean = out.loss
    if aux is not None:
        coef = core_model(model).config.router_aux_loss_coef
        mean = mean - coef * aux  # the model adds coef * aux to its loss; keep the two apart
    else:
        aux = torch.zeros((), device=mean.device)
    return mean * n, n, aux


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    metrics_path: Path
    model: Any  # the trained (unwrapped) model


class PlanTrainer:
    """What a trainer drawing its batches from a ``BatchPlan`` (SFT, DPO) adds to the chassis: the plan
    (``optim``'s batch fields, ``run.seed``, ``data.shuffle``), the step count, resuming on the same plan, and the
    loop with its checkpoint state, and a step's micro-batch mechanics (``_micro``, ``_backward``, ``_close_step``).
    DeepSpeed with accumulation is refused (accelerate's DeepSpeed backward also steps the engine, so every
    micro-batch would take a step). ``unit`` names the items in errors; ``moe_aux``: the subclass trains the router
    loss (``model.moe_aux_loss`` on a mixture of experts)."""

    unit = "items"
    moe_aux = False

    def __init__(self, config, n_items: int, *, stage: str, run_config: dict[str, Any] | None,
                 on_step: Callable[[int, dict[str, Any]], None] | None):
        self.config = config
        self.run_config = run_config or {}
        self.on_step = on_step
        self.chassis = Chassis(config.optim, config.checkpoint, config.logging, dtype=config.model.dtype, stage=stage)
        self.accelerator = acc = self.chassis.accelerator
        o = config.optim
        if acc.distributed_type.name == "DEEPSPEED" and o.grad_accumulation_steps > 1:
            raise TrainingError("optim.grad_accumulation_steps > 1 is not supported under DeepSpeed yet; "
                                "raise per_device_batch_size or use FSDP2 (recipes/accelerate/fsdp2_8gpu.yaml)")
        self.plan = BatchPlan(n_items, o.per_device_batch_size, o.grad_accumulation_steps, acc.num_processes,
                              seed=config.run.seed, shuffle=config.data.shuffle)
        self.total_steps = o.max_steps or o.epochs * self.plan.steps_per_epoch

    def _prepare(self, model) -> None:
        if self.config.model.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.model = self.chassis.prepare(model, self.total_steps)

    # -- one optimizer step -------------------------------------------------------------------------------------
    def _micro(self, m: int):
        """Around micro-batch ``m``'s forward and backward: its gradients accumulate without the all-reduce, except on
        the step's last micro-batch."""
        return self.accelerator.no_sync(self.model) if m < self.plan.accum - 1 else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, aux: torch.Tensor | None) -> None:
        """Backward of a micro-batch's ``loss`` plus, with ``moe_aux``, the router loss ``aux`` times the model's
        ``router_aux_loss_coef``, averaged over the step's micro-batches."""
        if self.moe_aux and aux is not None:
            loss = loss + core_model(self.model).config.router_aux_loss_coef * aux / self.plan.accum
        self.accelerator.backward(loss)

    def _close_step(self, step: int, loss: float, aux_sum: float, metrics: dict[str, Any]) -> dict[str, Any]:
        """The optimizer step that ends step ``step`` (a non-finite loss or gradient norm stops the run, the weights
        as they were before it), and ``metrics`` with what every plan trainer logs: the loss, the lr, the epoch, the
        router loss per micro-batch (``aux_sum``: over all of them, every process) and the clipped gradient norm."""
        grad_norm = self.chassis.optimizer_step(math.isfinite(loss))
        if grad_norm is None:
            raise TrainingError(f"step {step + 1}: the loss ({loss}) or the gradient norm is not finite; the weights "
                                "are those before this step")
        metrics = {"loss": loss, **metrics, "lr": self.chassis.lr, "epoch": self.plan.epoch_of(step)}
        if self.moe_aux:
            metrics["aux_loss"] = aux_sum / (self.plan.accum * self.accelerator.num_processes)
        if self.config.optim.max_grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    def resume(self) -> int:
        """The step training starts at: that of the checkpoint ``run.resume`` names (restored by the chassis), or 0.
        A checkpoint written for other data or another global batch is refused before anything is written (its step
        would index other samples)."""
        plan = self.plan

        def same_plan(state: dict[str, Any]) -> None:
            if state.get("n_items") != plan.n_items or state.get("global_batch") != plan.global_batch:
                raise TrainingError(
                    f"cannot resume from {self.chassis.checkpoints.resumed_from}: it was written for "
                    f"{state.get('n_items')} {self.unit} in global batches of {state.get('global_batch')}, this run "
                    f"has {plan.n_items} in batches of {plan.global_batch}; use another checkpoint.output_dir or "
                    "run.resume: null")

        state = self.chassis.resume(self.config.run.resume, same_plan)
        return int(state["step"]) if state is not None else 0

    def _run(self, start: int, step: Callable[[int], dict[str, Any]], before_log: Callable[[int, dict[str, Any]], None],
             sample_ids: Callable[[int], Iterable[int]], **kwargs: Any) -> dict[str, Any]:
        """``Chassis.run`` over this run's steps, each checkpoint recording the plan's position beside its step;
        ``before_log`` then the step's sample ids (``sample_ids(item)``, with ``logging.record_samples``) add to the
        logged metrics."""
        plan = self.plan

        def logged(done: int, metrics: dict[str, Any]) -> None:
            before_log(done, metrics)
            if self.config.logging.record_samples:
                metrics["samples"] = sorted(s for i in plan.global_indices(done - 1) for s in sample_ids(i))

        def state(done: int) -> dict[str, Any]:
            return {"epoch": plan.epoch_of(done), "batch_in_epoch": done % plan.steps_per_epoch,
                    "global_batch": plan.global_batch, "n_items": plan.n_items,
                    "world_size": self.accelerator.num_processes, "total_steps": self.total_steps}

        return self.chassis.run(start, self.total_steps, step, state, run_config=self.run_config,
                                before_log=logged, after_step=self.on_step, **kwargs)


class Trainer(PlanTrainer):
    """Trains ``model`` on ``items`` (lists of ``Segment``): ``packed`` picks ``collate_packed`` (one flat row per
    micro-batch) or ``collate_padded``; ``train()`` resumes as ``run.resume`` says and returns the unwrapped model."""

    def __init__(self, config: TrainConfig, model, items: Sequence[Sequence[Segment]], *, packed: bool,
                 pad_token_id: int, run_config: dict[str, Any] | None = None):
        self.items = list(items)
        super().__init__(config, len(self.items), stage="train", run_config=run_config, on_step=None)
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.moe_aux = router_loss_on(model, config.model.moe_aux_loss)
        self._prepare(model)

    # -- one optimizer step -------------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[tuple[dict[str, torch.Tensor], list[Sequence[Segment]]]]:
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
            with self._micro(m):
                with acc.autocast():
                    nll_sum, _, aux = masked_nll_sum(self.model, batch, self.moe_aux)
                self._backward(nll_sum.float() * scale, aux)
            nll_total += nll_sum.detach().double()
            aux_total += aux.detach().double()
            tokens += sum(len(s) for item in chosen for s in item)
            padded_cells += (len(chosen) * self.config.data.max_length if self.packed else batch["input_ids"].numel())
        sums = torch.stack([nll_total, aux_total, torch.tensor(float(tokens), dtype=torch.float64,
                            device=acc.device), torch.tensor(float(padded_cells), dtype=torch.float64,
                            device=acc.device)])
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        return self._close_step(step, float(sums[0] / n_global.double()), float(sums[1]), {
            "target_tokens": int(n_global), "tokens": int(sums[2]), "packing_efficiency": float(sums[2] / sums[3])})

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        start = self.resume()
        timing = {"t": time.perf_counter(), "tokens": 0}

        def step(i: int) -> dict[str, Any]:
            metrics = self.train_step(i)
            timing["tokens"] += metrics["tokens"]
            return metrics

        def before_log(done: int, metrics: dict[str, Any]) -> None:
            now = time.perf_counter()
            metrics["tokens_per_s"] = timing["tokens"] / max(now - timing["t"], 1e-9)
            timing["t"], timing["tokens"] = now, 0

        def figures(metrics: dict[str, Any]) -> dict[str, str]:
            out = {"loss": f"{metrics['loss']:.4f}"}
            if metrics.get("tokens_per_s"):
                out["tok/s"] = f"{metrics['tokens_per_s']:,.0f}"
            return out

        last = self._run(start, step, before_log, lambda i: (s.sample_id for s in self.items[i]), figures=figures)
        return TrainResult(self.total_steps, last.get("loss", float("nan")), self.chassis.metrics.path,
                           self.accelerator.unwrap_model(self.model))
