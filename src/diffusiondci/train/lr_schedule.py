"""Learning-rate schedules of the trainers: linear warm-up, then constant, cosine or poly decay.

``LRFactor(step)`` gives the factor applied to the optimizer's peak learning rate. The scheduler
saves only its step count with the checkpoints (the factor is rebuilt from the config), so a
resumed run continues on the same curve, and a run extended with more steps follows the new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LR_SCHEDULES", "LRFactor", "make_lr_scheduler"]

#: ``lr_schedule`` options.
LR_SCHEDULES = ("constant", "cosine", "poly")


@dataclass
class LRFactor:
    """Factor of the peak LR at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps. Then ``constant`` stays at 1;
    ``cosine`` falls to ``min_ratio`` along a half cosine by ``total`` steps; ``poly`` follows
    ``(1 - progress) ** 0.9`` (nnU-Net), floored at ``min_ratio``. Past ``total`` the last value holds.
    """

    schedule: str
    total: int
    warmup: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if self.warmup < 0 or self.total < 0 or not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError("lr warm-up and total steps must be >= 0 and lr_min_ratio in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.schedule == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.min_ratio, (1.0 - progress) ** 0.9)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total: int, warmup: int = 0, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A ``LambdaLR`` following :class:`LRFactor`, or None for a constant LR without warm-up.

    The warm-up is capped at a fifth of the planned steps, so a short run (a test, the demo, a quick
    look) still spends most of its steps at the peak and on the decay.
    """
    warmup = min(int(warmup), int(total) // 5)
    if schedule == "constant" and warmup == 0:
        return None
    factor = LRFactor(schedule, total, warmup, min_ratio)
    # a plain function: LambdaLR keeps it out of its state_dict (see the module docstring)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
