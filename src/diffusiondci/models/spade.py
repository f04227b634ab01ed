"""SPADE with one mask encoder per resolution: the cheap form of the DSDM decoder's mask conditioning.

SPADE (Park et al. 2019) normalises ``x`` without affine parameters and modulates it with a
spatial scale and shift computed from the semantic mask: ``GN(x) * (1 + gamma) + beta`` with
``gamma, beta = conv(relu(conv(mask)))``. SDM (and MONAI's ``SPADE``) give every normalisation
layer its own mask encoder ``relu(conv(mask))`` and separate ``gamma`` / ``beta`` convolutions:
three full-resolution convolutions per norm, six per decoder ResBlock, more than the ResBlock's
own two.

Here the mask encoder runs once per decoder resolution (:class:`MaskEncoder`), and each norm keeps
only its own modulation, one convolution that yields ``gamma`` and ``beta`` together
(:class:`SharedSPADE`), whose kernel may be 1x1 (the encoder's 3x3 already gives each hidden
pixel its neighbourhood; a 3x3 modulation of the 2C-channel output is the single most expensive
convolution of the decoder at full resolution). Per norm the modulation is still spatially adaptive and learned separately;
what is shared is the first layer's reading of the mask. ``UNetConfig.spade_mode = "shared"``
selects it; ``"per_block"`` keeps MONAI's SDM-style SPADE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskEncoder", "SharedSPADE"]


class MaskEncoder(nn.Module):
    """``relu(conv(mask))`` at one decoder resolution: the hidden map every SPADE there reads."""

    def __init__(self, label_nc: int, hidden_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(label_nc, hidden_channels, 3, padding=1)

    def forward(self, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``mask``: one-hot ``(N, label_nc, H, W)``; resized (nearest) to ``size`` first."""
        if tuple(mask.shape[-2:]) != tuple(size):
            mask = F.interpolate(mask, size=size, mode="nearest")
        return F.relu(self.conv(mask))


class SharedSPADE(nn.Module):
    """``GroupNorm(x) * (1 + gamma) + beta``, ``[gamma, beta] = conv(hidden)`` (one convolution).

    Drop-in for the ``norm1`` / ``norm2`` of MONAI's ``SPADEDiffResBlock``, whose forward calls
    ``norm(h, seg)``: the DSDM passes the level's :class:`MaskEncoder` output as ``seg``.
    """

    def __init__(self, channels: int, hidden_channels: int, num_groups: int, eps: float, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps, affine=False)
        self.modulation = nn.Conv2d(hidden_channels, 2 * channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"SPADE hidden map {tuple(hidden.shape[-2:])} does not match features {tuple(x.shape[-2:])}")
        gamma, beta = self.modulation(hidden).chunk(2, dim=1)
        return torch.addcmul(beta, self.norm(x), 1 + gamma)
