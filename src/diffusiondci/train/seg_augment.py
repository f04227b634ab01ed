"""The training augmentation and loss of ``diffusiondci train-seg`` (paper §V-A3, plus dihedral
moves and zoom).

One optimizer step (the same recipe for every variant, the plain U-Net included):

1. a batch of real (and, with ``synthetic_ratio`` > 0, synthetic) labelled patches is moved by a
   random dihedral transform ``k`` (``augment``: ``dihedral`` = the 8 flips / quarter turns,
   ``hflip`` = the paper's horizontal flip p = 0.5, ``none``), image and mask together
   (:func:`diffusiondci.data.augment.dihedral`);
2. the frozen DSDM's features of that **un-jittered view** come from the feature cache
   (:mod:`diffusiondci.segmentation.feature_cache`: computed once per image and ``k``, NULL mask,
   the view's own reference embedding, kept on disk under ``feature_cache``);
3. the segmenter's input is the view with the paper's colour jitter (brightness / contrast /
   saturation / hue, p = ``jitter_p``) and a mild random zoom (``scale_range``), the zoom applied
   alike to the mask (nearest) and the DSDM features (bilinear) so that all stay aligned;
4. the loss is ``dice_ce`` (MONAI ``DiceCELoss``: softmax, background included, Dice over the
   batch + cross-entropy) or the paper's pixel cross-entropy (``ce``), each class weighted by
   ``class_weights`` (``balanced``: median-frequency weights of the labelled training masks); the optimizer and its
   learning-rate schedule belong to the trainer (:mod:`diffusiondci.train.segmentation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from monai.losses import DiceCELoss

from ..data.augment import AUGMENTATIONS, dihedral
from ..errors import UserInputError
from .seg_config import CLASS_WEIGHTS, LOSSES, SegConfig


ViewFeatures = Callable[[torch.Tensor, list[int]], Mapping[int, torch.Tensor]]


def draw_dihedral(n: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """One dihedral transform index per sample, drawn like :func:`diffusiondci.data.augment.random_dihedral`
    (``dihedral``: 0..7; ``hflip``: 0 or 4 = flip, p = 0.5; ``none``: 0, nothing drawn)."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "none":
        return torch.zeros(n, dtype=torch.long)
    draws = torch.randint(0, 8 if mode == "dihedral" else 2, (n,), generator=generator)
    return draws * 4 if mode == "hflip" else draws


def apply_dihedral(x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``dihedral(x[i], states[i])`` for every sample (square images)."""
    out = x.clone()
    for k in states.unique().tolist():
        if k:
            idx = (states == k).nonzero().flatten().to(x.device)
            out[idx] = dihedral(x[idx], int(k))
    return out


def colour_jitter(images: torch.Tensor, cfg: SegConfig, generator: torch.Generator) -> torch.Tensor:
    """The paper's jitter with probability ``jitter_p`` per image: brightness shift in ``[-b, b]``,
    contrast and saturation factors in ``[1-c, 1+c]``, hue shift in ``[-h, h]`` turns (kornia)."""
    n, dev = images.shape[0], images.device
    u = torch.rand(n, 5, generator=generator).to(dev)
    jitter = u[:, 0] < cfg.jitter_p
    if not bool(jitter.any()):
        return images
    x = (images + 1) / 2
    y = adjust_brightness(x, (u[:, 1] * 2 - 1) * cfg.brightness)
    y = adjust_contrast(y, 1 + (u[:, 2] * 2 - 1) * cfg.contrast)
    y = adjust_saturation(y, 1 + (u[:, 3] * 2 - 1) * cfg.saturation)
    y = adjust_hue(y, (u[:, 4] * 2 - 1) * cfg.hue * 2 * math.pi)
    y = y.clamp(0, 1) * 2 - 1
    return torch.where(jitter[:, None, None, None], y, images)


def random_zoom(
    images: torch.Tensor, masks: torch.Tensor, features: Mapping[int, torch.Tensor] | None, cfg: SegConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor] | None]:
    """Zoom each sample about its centre by ``s`` uniform in ``scale_range`` (s > 1 magnifies),
    images and features bilinear, masks nearest, borders reflected; one affine grid in normalised
    coordinates for every resolution keeps them aligned."""
    n, dev = images.shape[0], images.device
    lo, hi = cfg.scale_range
    s = lo + (hi - lo) * torch.rand(n, generator=generator)
    if lo == hi == 1.0:
        return images, masks, dict(features) if features is not None else None
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
    theta = theta.to(dev, images.dtype)

    def warp(x: torch.Tensor, mode: str) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)

    images = warp(images, "bilinear")
    masks = warp(masks[:, None].float(), "nearest")[:, 0].round().long()
    feats = {b: warp(f, "bilinear") for b, f in features.items()} if features is not None else None
    return images, masks, feats


def augment_views(
    images: torch.Tensor, masks: torch.Tensor, cfg: SegConfig, generator: torch.Generator,
    view_features: ViewFeatures | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor] | None]:
    """The training augmentation (module docstring, steps 1-3): ``(images, masks, features)``.

    ``view_features(views, states)`` gives the frozen DSDM's features of the un-jittered views
    ``dihedral(images[i], states[i])`` (e.g. :meth:`FeatureCache.features`); it never sees the
    colour-jittered image nor the mask. All draws come from ``generator`` (saved with the
    checkpoints, so a resumed run augments identically).
    """
    states = draw_dihedral(images.shape[0], cfg.augment, generator)
    views = apply_dihedral(images, states)
    masks = apply_dihedral(masks, states)
    feats = dict(view_features(views, states.tolist())) if view_features is not None else None
    x = colour_jitter(views, cfg, generator)
    return random_zoom(x, masks, feats, cfg, generator)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: SegConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment_views` without DSDM features: ``(images, masks)``."""
    x, y, _ = augment_views(images, masks, cfg, generator)
    return x, y


def make_loss(name: str, weight: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits (N, C, H, W), labels (N, H, W) -> loss``: ``ce`` (the paper's pixel cross-entropy) or
    ``dice_ce`` = MONAI ``DiceCELoss`` (softmax, background included, labels one-hot; the soft Dice
    of each class pooled over the batch, averaged over classes, plus the mean cross-entropy).
    ``weight`` (one per class) rescales each class's cross-entropy and, in ``dice_ce``, its Dice term."""
    if name == "ce":
        return lambda logits, labels: F.cross_entropy(
            logits, labels, weight=weight.to(logits.device) if weight is not None else None)
    if name != "dice_ce":
        raise UserInputError(f"seg.loss must be one of {LOSSES}, got {name!r}")
    dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, batch=True, weight=weight)
    return lambda logits, labels: dice_ce(logits, labels[:, None])


def class_weights(mode: str, masks: Iterable[torch.Tensor], num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights of ``seg.class_weights`` from the training masks: ``none`` -> None;
    ``balanced`` -> median-frequency balancing (Eigen & Fergus 2015), ``w_c = median(f) / f_c`` with
    ``f_c`` the pixel share of class ``c``, so that a class rare in the labelled slides (benign glands
    in GlaS' training split) weighs as much in the loss as a common one. A class absent from the
    masks gets weight 1."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise UserInputError(f"seg.class_weights must be one of {CLASS_WEIGHTS}, got {mode!r}")
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for m in masks:
        counts += torch.bincount(m.flatten().long(), minlength=num_classes)[:num_classes].double()
    present = counts > 0
    if not present.any():
        raise UserInputError("seg.class_weights balanced: the training masks hold no pixels")
    freq = counts / counts.sum()
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = torch.quantile(freq[present], 0.5) / freq[present]
    return weights.float()
