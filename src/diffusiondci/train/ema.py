"""Exponential moving average of a model's weights, updated after every optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffusiondci.errors import UserInputError
from diffusiondci.runs.weights import unwrap_model


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging, as in DDPM/ADM).

    After every optimizer step ``theta_ema <- d * theta_ema + (1 - d) * theta`` for floating-point
    parameters; buffers (e.g. BatchNorm statistics) are copied. With ``warmup`` the decay is
    ``min(d, (1 + n) / (10 + n))`` after ``n`` updates (as in diffusers' EMAModel), which helps
    short runs. ``module`` is a frozen copy kept in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise UserInputError(f"ema_decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = unwrap_model(model)
        for e, p in zip(self.module.parameters(), src.parameters(), strict=True):
            if e.is_floating_point():
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p)
        for e, b in zip(self.module.buffers(), src.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1
