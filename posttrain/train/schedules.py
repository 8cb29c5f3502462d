"""Learning-rate schedules: linear warmup then cosine decay, and warmup-stable-decay (WSD).

``lr_lambda(kind, ...)`` returns the multiplier of the peak learning rate at an optimizer step; ``build_scheduler``
wraps it in a ``torch.optim.lr_scheduler.LambdaLR``. The scheduler's position is its ``last_epoch`` (the number of
optimizer steps taken), so ``state_dict``/``load_state_dict`` resume it exactly. Do not hand the scheduler to
``accelerator.prepare``: accelerate would step it once per process; register it for checkpointing instead
(``posttrain.train.checkpointing`` does). This module never touches parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

ScheduleKind = Literal["cosine", "wsd", "constant"]


def lr_lambda(kind: ScheduleKind, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
              decay_fraction: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the peak lr at step ``step`` (0-based count of optimizer steps already taken).

    - ``cosine``: linear warmup over ``warmup_steps``, then a half cosine from 1 to ``min_lr_ratio`` at ``total_steps``.
    - ``wsd``: linear warmup, a stable plateau at 1, then a linear decay to ``min_lr_ratio`` over the last
      ``decay_fraction`` of ``total_steps`` (the schedule used for staged pre-training: a stage can be continued
      from its plateau checkpoint).
    - ``constant``: linear warmup, then 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be between 0 and the run's total steps ({total_steps}), got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
    decay_steps = max(1, round(decay_fraction * total_steps))

    def cosine(step: int) -> float:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    schedules = {"cosine": cosine, "wsd": wsd, "constant": lambda step: 1.0}
    if kind not in schedules:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(schedules)}")
    after_warmup = schedules[kind]

    def multiplier(step: int) -> float:
        return (step + 1) / (warmup_steps + 1) if step < warmup_steps else after_warmup(step)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, kind: ScheduleKind, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0, decay_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(kind, total_steps, warmup_steps, min_lr_ratio, decay_fraction))
