"""How much of its initial (random) weights an EMA model still holds after ``n`` updates.

Each update keeps ``d_k`` of the average and adds ``1 - d_k`` of the live weights, so the
initialisation survives with weight ``prod_k d_k``: ``d ** n`` for a fixed decay (0.9999 keeps 61 %
after 5 000 steps), and nearly nothing after a few dozen steps with the warm-up
``d_k = min(d, (1 + k) / (10 + k))``. Sampling from an EMA that is still mostly its
initialisation gives noise whatever the training loss says; loaders warn about it.
"""

from __future__ import annotations

import math

__all__ = ["ema_initial_share"]


def ema_initial_share(decay: float, warmup: bool, updates: int) -> float:
    """Weight of the initial parameters in the EMA after ``updates`` updates (see the module docstring)."""
    if updates <= 0:
        return 1.0
    if not warmup:
        return float(decay) ** int(updates)
    log_share = 0.0
    for k in range(int(updates)):
        d = min(float(decay), (1 + k) / (10 + k))
        if d <= 0.0:
            return 0.0
        log_share += math.log(d)
        if log_share < -50:  # below 1e-21: nothing left worth counting
            return 0.0
    return math.exp(log_share)
