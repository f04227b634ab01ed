"""Test-time augmentation (TTA) of a segmenter's predictions.

Tissue has no preferred orientation (:mod:`diffusiondci.data.augment`), and the segmenters train on
all eight flips / quarter turns of each patch. At prediction time the same moves give several views
of one patch; each view is segmented, its class probabilities are moved back onto the patch, and the
average is the prediction (nnU-Net mirrors its inputs the same way by default). Modes:

* ``none``: one view;
* ``flip``: the patch and its left-right mirror (2 views);
* ``dihedral``: all 8 views (8x the inference cost; for DiffusionDCI the frozen DSDM also runs on
  every view, since its features follow the view as they did in training).

On the GlaS stand-in (16 annotated slides, 3 draws), ``dihedral`` raised DiffusionDCI's validation
Dice in every draw (docs/user-guide.md, section 4.6), so it is the default of ``train-seg``'s final
scoring and of ``segment``; validation during training uses one view (it only ranks checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.augment import dihedral, inverse_dihedral
from ..errors import UserInputError

__all__ = ["TTA_MODES", "predict_with_tta", "tta_views"]

#: ``tta`` options, each with the dihedral transforms (``diffusiondci.data.augment.dihedral``) it averages.
TTA_MODES = {"none": (0,), "flip": (0, 4), "dihedral": tuple(range(8))}


def tta_views(mode: str) -> tuple[int, ...]:
    """The dihedral transform indices of ``mode`` (a clear error for an unknown one)."""
    if mode not in TTA_MODES:
        raise UserInputError(f"tta must be one of {tuple(TTA_MODES)}, got {mode!r}")
    return TTA_MODES[mode]


def predict_with_tta(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     mode: str = "none") -> torch.Tensor:
    """``(N, C, H, W)`` scores of ``images`` (square patches) under ``mode``: the logits of
    ``logits_fn(images)`` for ``none``; else the log of the class probabilities averaged over the
    views (a softmax of them gives the average, and their arg-max is the averaged decision)."""
    views = tta_views(mode)
    if views == (0,):
        return logits_fn(images)
    if images.shape[-1] != images.shape[-2]:
        raise UserInputError(f"tta {mode!r} needs square patches, got {tuple(images.shape[-2:])}")
    total = None
    for k in views:
        probs = inverse_dihedral(torch.softmax(logits_fn(dihedral(images, k)).float(), dim=1), k)
        total = probs if total is None else total + probs
    assert total is not None
    return torch.log((total / len(views)).clamp_min(1e-12))
