"""Label-preserving geometric augmentation applied jointly to images and masks.

Tissue has no preferred orientation, so the eight symmetries of the square (the dihedral group:
four 90-degree rotations, each with or without a horizontal flip) turn one labelled patch into
eight equally valid ones. :func:`dihedral` applies one of them to a batch of tensors of the same
spatial size (images ``N x C x H x W``, masks ``N x H x W`` or one-hot ``N x K x H x W``), so the
image and its mask always move together. :func:`random_dihedral` draws one transform per sample
from a ``torch.Generator``, which keeps the augmentation inside a resumable training step's RNG.
"""

from __future__ import annotations

import torch

__all__ = ["AUGMENTATIONS", "dihedral", "inverse_dihedral", "random_dihedral"]

#: ``augment`` options: no augmentation, horizontal flips, or the full dihedral group.
AUGMENTATIONS = ("none", "hflip", "dihedral")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` in 0..7 of the last two axes: rotate by ``k % 4`` quarter turns, then flip
    left-right when ``k >= 4``. ``k = 0`` is the identity."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral transform index must be in 0..7, got {k}")
    out = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


def inverse_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`dihedral` ``k``: ``inverse_dihedral(dihedral(x, k), k) == x`` (used to map
    test-time-augmented predictions back onto the image)."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral transform index must be in 0..7, got {k}")
    out = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(out, -(k % 4), dims=(-2, -1)) if k % 4 else out


def random_dihedral(
    tensors: list[torch.Tensor], mode: str = "dihedral", generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Apply the same random transform per sample to every tensor in ``tensors`` (dim 0 = batch).

    ``mode``: ``"dihedral"`` draws from all 8 transforms, ``"hflip"`` from {identity, flip},
    ``"none"`` returns the tensors unchanged (and draws nothing).
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "none" or not tensors:
        return list(tensors)
    n = tensors[0].shape[0]
    if any(t.shape[0] != n or t.shape[-2:] != tensors[0].shape[-2:] for t in tensors):
        raise ValueError("tensors to augment jointly need the same batch size and spatial size")
    draws = torch.randint(0, 8 if mode == "dihedral" else 2, (n,), generator=generator)
    if mode == "hflip":
        draws = draws * 4  # 0 = identity, 4 = flip
    out = [t.clone() for t in tensors]
    for k in draws.unique().tolist():
        if k == 0:
            continue
        idx = (draws == k).nonzero().flatten().to(tensors[0].device)
        for src, dst in zip(tensors, out):
            dst[idx] = dihedral(src[idx], int(k))
    return out
