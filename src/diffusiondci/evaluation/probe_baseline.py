"""The ddpm-segmentation-style pixel-classifier baseline of Table 6, built from the probe's pieces."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..errors import UserInputError
from ..runs.seeds import derive_seed
from .metrics import MetricAccumulator
from .probe_classifier import fit_pixel_classifier
from .probe_config import TAG_BASELINE, ProbeConfig
from .probe_features import (
    check_image_size,
    feature_batches,
    load_extractor,
    load_split,
    pixel_sample,
    train_pixels,
    upsample,
    with_grid,
)

def pixel_classifier_baseline(
    data: str | Path,
    dsdm_run: str | Path,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    cfg: ProbeConfig | None = None,
    split: str = "test",
    max_images: int | None = None,
    ensemble: int = 1,
    checkpoint: str = "latest",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """ddpm-segmentation-style segmentation of ``split`` (the Table 6 baseline).

    Features of ``blocks`` x ``timesteps`` of the frozen DSDM are upsampled to the mask size and
    concatenated per pixel; ``ensemble`` pixel classifiers (``cfg``: steps, lr, hidden,
    batch_pixels, pixels_per_image, seed) are trained on the labelled train split (all images, or a
    seeded ``max_images`` subset) and every labelled image of ``split`` is predicted (majority vote
    over the ensemble, as ddpm-segmentation). Returns :meth:`MetricAccumulator.compute` (per-image
    scores at the top level, ``"dataset"`` for the summed confusion matrix) plus the settings.
    """
    cfg = cfg or ProbeConfig()
    if ensemble < 1:
        raise UserInputError(f"ensemble must be >= 1, got {ensemble}")
    data, dsdm_run = Path(data), Path(dsdm_run)
    dev = resolve_device(device)
    base, info = load_extractor(dsdm_run, checkpoint, dev, cfg.seed)
    extractor = with_grid(base, blocks, timesteps)
    train_x, train_y, train_ids = load_split(data, "train", max_images, cfg.seed, 0)
    check_image_size(train_x, base, data)
    size = tuple(train_y.shape[-2:])
    samples = [pixel_sample(size[0] * size[1], cfg.pixels_per_image, cfg.seed, i) for i in range(len(train_ids))]
    feats, labels = train_pixels(extractor, train_x, train_y, samples, cfg.batch_size, dev, concat=True)
    models = [
        fit_pixel_classifier(feats[-1], labels, cfg.steps, cfg.lr, derive_seed(cfg.seed, TAG_BASELINE, k),
                             cfg.batch_pixels, cfg.hidden, device=dev)
        for k in range(ensemble)
    ]
    del feats, labels
    test_x, test_y, test_ids = load_split(data, split, None, cfg.seed, 2)
    acc = MetricAccumulator()
    for start, fmap in feature_batches(extractor, test_x, cfg.batch_size, dev):
        for j in range(next(iter(fmap.values())).shape[0]):
            up = torch.cat([upsample(fmap[b][j:j + 1], size)[0] for b in sorted(fmap)]).flatten(1).t()
            votes = torch.stack([m.predict(up) for m in models])  # (ensemble, HW)
            pred = votes.mode(dim=0).values if ensemble > 1 else votes[0]
            acc.update(pred.view(size).cpu(), test_y[start + j])
    result = acc.compute()
    result.update({
        "method": "pixel_classifier", "split": split, "blocks": sorted({int(b) for b in blocks}),
        "timesteps": [int(t) for t in timesteps], "ensemble": int(ensemble),
        "num_train_images": len(train_ids), "channels": sum(extractor.feature_channels().values()),
        "dsdm_run": str(dsdm_run), "checkpoint_step": info.step, "config": dataclasses.asdict(cfg),
    })
    return result


__all__ = ["pixel_classifier_baseline"]
