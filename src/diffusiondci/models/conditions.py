"""The conditions the DSDM network reads, as tensors: label masks as one-hot maps (the SPADE input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .unet import NUM_MASK_CLASSES


def mask_one_hot(mask: torch.Tensor, num_classes: int = NUM_MASK_CLASSES) -> torch.Tensor:
    """``(N, H, W)`` labels -> ``(N, K, H, W)`` float one-hot (the SPADE input)."""
    return F.one_hot(mask.long(), num_classes).permute(0, 3, 1, 2).float()
