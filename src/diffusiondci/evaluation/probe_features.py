"""Feature collection of the probe: labelled image subsets and the frozen DSDM's per-pixel features.

Training pixels are subsampled per image (a seeded fixed subset) and kept in float16; val features
stay at the block's own resolution in float16 and are upsampled one image at a time (bilinear, as
ddpm-segmentation). One DSDM forward per image batch serves every block of its timesteps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.patch_dataset import PatchDataset
from ..errors import UserInputError
from ..runs.seeds import derive_seed
from ..segmentation.features import DiffusionFeatureExtractor
from .probe_config import TAG_PIXELS, TAG_SUBSET

def _subset(n: int, k: int | None, seed: int, tag: int) -> list[int]:
    """A seeded sorted subset of ``range(n)`` of size ``k`` (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(seed, TAG_SUBSET, tag))
    return sorted(int(i) for i in rng.choice(n, size=int(k), replace=False))


def load_split(
    data: Path, split: str, count: int | None, seed: int, tag: int,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images ``(N, 3, H, W)`` in [-1, 1], masks ``(N, H, W)`` long and ids of a labelled subset."""
    ds = PatchDataset(data, splits=(split,), with_masks=True, labelled_only=True)
    if len(ds) == 0:
        hint = "re-run prepare with a larger --val-fraction" if split == "val" else "label some images"
        raise UserInputError(f"the dataset has no labelled '{split}' images; {hint}", data)
    items = [ds[i] for i in _subset(len(ds), count, seed, tag)]
    sizes = {tuple(it["image"].shape) for it in items}
    if len(sizes) != 1:
        raise UserInputError(f"'{split}' patches differ in size {sorted(sizes)}; the probe needs one patch size", data)
    images = torch.stack([it["image"] for it in items])
    return images, torch.stack([it["mask"] for it in items]), [it["id"] for it in items]


def load_extractor(dsdm_run: Path, checkpoint: str, device: torch.device, seed: int):
    """The frozen DSDM (EMA weights) as a feature extractor over all decoder blocks, plus its run info."""
    from ..diffusion.pipeline import load_dsdm

    model, schedule, info = load_dsdm(dsdm_run, checkpoint=checkpoint, ema=True, device=device)
    all_blocks = list(range(model.num_decoder_blocks))
    extractor = DiffusionFeatureExtractor(model, schedule, info.encoder, all_blocks, [0], seed=seed)
    return extractor, info


def with_grid(
    base: DiffusionFeatureExtractor, blocks: Sequence[int], timesteps: Sequence[int],
) -> DiffusionFeatureExtractor:
    """The same frozen networks tapped at other blocks/timesteps (no reload)."""
    return DiffusionFeatureExtractor(base.dsdm, base.schedule, base.encoder, blocks, timesteps, seed=base.seed)


def check_image_size(images: torch.Tensor, extractor: DiffusionFeatureExtractor, data: Path) -> None:
    h, w = images.shape[-2:]
    size = extractor.image_size
    if (h, w) != (size, size):
        raise UserInputError(
            f"patches are {h}x{w} px but the DSDM was trained on {size}x{size}; "
            "probe it on a dataset of its patch size",
            data,
        )


def upsample(feat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, h, w) -> (N, C, H, W)`` bilinear (ddpm-segmentation), float32."""
    feat = feat.float()
    if tuple(feat.shape[-2:]) == tuple(size):
        return feat
    return F.interpolate(feat, size=size, mode="bilinear", align_corners=False)


def pixel_sample(hw: int, k: int | None, seed: int, image_key: int) -> torch.Tensor | None:
    """Fixed flat pixel indices of one training image (None = all pixels)."""
    if not k or k >= hw:
        return None
    rng = np.random.default_rng(derive_seed(seed, TAG_PIXELS, image_key))
    return torch.from_numpy(np.sort(rng.choice(hw, size=int(k), replace=False)))


def feature_batches(extractor: DiffusionFeatureExtractor, images: torch.Tensor, batch_size: int,
             device: torch.device) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    for start in range(0, images.shape[0], batch_size):
        yield start, extractor(images[start:start + batch_size].to(device))


def train_pixels(
    extractor: DiffusionFeatureExtractor, images: torch.Tensor, masks: torch.Tensor,
    samples: list[torch.Tensor | None], batch_size: int, device: torch.device, concat: bool,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Sampled training pixels: ``({block: (P, C) float16}, labels (P,))`` (``concat``: one key -1
    holding every block's upsampled features side by side)."""
    size = tuple(masks.shape[-2:])
    per_block: dict[int, list[torch.Tensor]] = {}
    for start, feats in feature_batches(extractor, images, batch_size, device):
        for j in range(next(iter(feats.values())).shape[0]):
            idx = samples[start + j]
            ups = [upsample(feats[b][j:j + 1], size)[0].flatten(1) for b in sorted(feats)]  # each (C, HW)
            cols = [torch.cat(ups, 0)] if concat else ups
            keys = [-1] if concat else sorted(feats)
            for key, col in zip(keys, cols):
                col = col if idx is None else col[:, idx.to(col.device)]
                per_block.setdefault(key, []).append(col.t().to("cpu", torch.float16))
    labels = torch.cat([m.flatten() if s is None else m.flatten()[s] for m, s in zip(masks, samples)])
    return {b: torch.cat(v) for b, v in per_block.items()}, labels


def val_features(
    extractor: DiffusionFeatureExtractor, images: torch.Tensor, batch_size: int, device: torch.device,
) -> dict[int, torch.Tensor]:
    """Native-resolution features ``{block: (N, C, h, w) float16}`` on the CPU."""
    out: dict[int, list[torch.Tensor]] = {}
    for _, feats in feature_batches(extractor, images, batch_size, device):
        for b, f in feats.items():
            out.setdefault(b, []).append(f.to("cpu", torch.float16))
    return {b: torch.cat(v) for b, v in out.items()}


__all__ = ["check_image_size", "feature_batches", "load_extractor", "load_split", "pixel_sample", "train_pixels",
           "upsample", "val_features", "with_grid"]
