"""Which DSDM features segment best? The pixel-classifier probe of paper §IV-C1 / Fig. 3.

For every decoder block ``b`` and timestep ``t`` of a grid (default: all decoder blocks x every
100th step in [100, 1000], :func:`~diffusiondci.segmentation.features.paper_probe_timesteps`), the
frozen DSDM's features (:class:`~diffusiondci.segmentation.features.DiffusionFeatureExtractor`:
NULL mask, the image's own reference) of a small labelled subset of the train split are upsampled
bilinearly to the mask resolution, a small per-pixel MLP is trained on them (the pixel classifier of
ddpm-segmentation, the paper's ref. [39]) and its mIoU / mean Dice on a subset of the val split are
measured with :class:`~diffusiondci.evaluation.metrics.MetricAccumulator` (per-image means, the
toolkit's default reported numbers).

Memory: training pixels are subsampled per image (``pixels_per_image``, a seeded fixed subset) and
kept in float16; val features are kept at the block's own resolution in float16 and upsampled one
image at a time. One DSDM forward per (timestep, image batch) serves every block of that timestep.

Reproducibility / resume: each (block, timestep) cell has its own seed, the subsets and pixel
samples are fixed by ``seed``, and the feature noise by (seed, t), so a cell's score does not depend
on which other cells are computed. ``probe.csv`` is rewritten after every cell; a rerun with the
same settings (the grid may change) skips the cells already in it.

The same pieces give the ddpm-segmentation-style baseline of Table 6:
:func:`pixel_classifier_baseline` (several blocks/timesteps concatenated, optional ensemble with
majority vote as in ddpm-segmentation).

This module runs the grid and re-exports the probe's public names; the pieces live beside it:
``probe_config`` (settings), ``probe_features`` (feature collection), ``probe_classifier``
(classifier training), ``probe_results`` (probe.csv, summary, heat map) and ``probe_baseline``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..data.imageio import write_json_atomic
from ..device import resolve_device
from ..errors import UserInputError
from ..runs.seeds import derive_seed
from ..segmentation.features import paper_probe_timesteps
from .metrics import MetricAccumulator
from .probe_baseline import pixel_classifier_baseline
from .probe_classifier import PixelClassifier, fit_pixel_classifier
from .probe_config import TAG_FIT, ProbeConfig
from .probe_features import (
    check_image_size,
    load_extractor,
    load_split,
    pixel_sample,
    train_pixels,
    upsample,
    val_features,
    with_grid,
)
from .probe_results import (
    CSV_COLUMNS,
    check_resume,
    plot_probe_heatmap,
    read_probe_csv,
    settings_key,
    summarize_probe,
    write_probe_csv,
)

__all__ = [
    "CSV_COLUMNS",
    "PixelClassifier",
    "ProbeConfig",
    "fit_pixel_classifier",
    "pixel_classifier_baseline",
    "plot_probe_heatmap",
    "read_probe_csv",
    "run_probe",
    "summarize_probe",
]


def _predict(model: PixelClassifier, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label map ``(H, W)`` of one image from its native features ``(C, h, w)``."""
    dev = model.mean.device
    up = upsample(feats[None].to(dev), size)[0].flatten(1).t()
    return model.predict(up).view(size).cpu()


def _scores(acc: MetricAccumulator) -> tuple[float, float]:
    res = acc.compute()
    as_float = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return as_float(res["mean_iou"]), as_float(res["mean_dice"])


def run_probe(
    data: str | Path,
    dsdm_run: str | Path,
    out_dir: str | Path,
    cfg: ProbeConfig | None = None,
    progress: bool = True,
    checkpoint: str = "latest",
    device: str | torch.device | None = None,
    log=None,
) -> dict[str, Any]:
    """Probe every (block, timestep) of the grid; write probe.csv, probe_heatmap.png, probe.json.

    Returns the content of ``probe.json``: ``settings``, ``grid`` (blocks, timesteps), ``best``,
    ``top_blocks``, ``top_timesteps``, ``suggested_config`` / ``suggested_yaml`` (see
    :func:`summarize_probe`; computed over every row of probe.csv) and the output paths.
    """
    cfg = cfg or ProbeConfig()
    data, dsdm_run, out_dir = Path(data), Path(dsdm_run), Path(out_dir)
    dev = resolve_device(device)
    base, info = load_extractor(dsdm_run, checkpoint, dev, cfg.seed)
    n_blocks, n_t = base.dsdm.num_decoder_blocks, base.schedule.num_timesteps
    blocks = cfg.blocks if cfg.blocks is not None else list(range(n_blocks))
    timesteps = cfg.timesteps if cfg.timesteps is not None else paper_probe_timesteps(n_t)
    with_grid(base, blocks, timesteps)  # validates the grid (UserInputError on bad blocks/timesteps)

    train_x, train_y, train_ids = load_split(data, "train", cfg.train_images, cfg.seed, 0)
    val_x, val_y, val_ids = load_split(data, "val", cfg.val_images, cfg.seed, 1)
    check_image_size(train_x, base, data)
    size = tuple(train_y.shape[-2:])

    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("blocks", "timesteps")}
    settings = {
        **fixed, "data": str(data.resolve()), "dsdm_run": str(dsdm_run.resolve()),
        "checkpoint": checkpoint, "checkpoint_step": info.step, "num_timesteps": n_t,
        "train_ids": train_ids, "val_ids": val_ids,
    }
    key = settings_key(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume(out_dir, key, settings)
    csv_path, json_path, png_path = out_dir / "probe.csv", out_dir / "probe.json", out_dir / "probe_heatmap.png"
    rows = read_probe_csv(csv_path)
    done = {(r["block"], r["timestep"]) for r in rows}
    todo = [(t, b) for t in timesteps for b in blocks if (b, t) not in done]
    meta = {"settings": settings, "settings_key": key, "grid": {"blocks": blocks, "timesteps": timesteps},
            "complete": False}
    write_json_atomic(json_path, meta)
    if log and done:
        log(f"resuming: {len(done)} cells already in {csv_path}, {len(todo)} to go")

    samples = [pixel_sample(size[0] * size[1], cfg.pixels_per_image, cfg.seed, i) for i in range(len(train_ids))]
    shapes = base.dsdm.decoder_feature_shapes
    from ..progress import progress_bar  # a bar on a terminal, plain lines in a log

    bar = progress_bar(len(todo), "probe", unit="cell", enabled=progress, leave=False)
    try:
        for t in timesteps:
            pending = [b for b in blocks if (b, t) not in done]
            if not pending:
                continue
            extractor = with_grid(base, pending, [t])
            train_f, labels = train_pixels(extractor, train_x, train_y, samples, cfg.batch_size, dev, concat=False)
            val_f = val_features(extractor, val_x, cfg.batch_size, dev)
            for b in pending:
                bar.set_postfix(timestep=t, block=b)
                model = fit_pixel_classifier(train_f[b], labels, cfg.steps, cfg.lr,
                                             derive_seed(cfg.seed, TAG_FIT, b, t), cfg.batch_pixels, cfg.hidden,
                                             device=dev)
                acc = MetricAccumulator()
                for i in range(val_f[b].shape[0]):
                    acc.update(_predict(model, val_f[b][i], size), val_y[i])
                miou, dice = _scores(acc)
                c, h, w = shapes[b]
                rows.append({"block": b, "timestep": t, "miou": miou, "dice": dice, "channels": c,
                             "resolution": f"{h}x{w}"})
                done.add((b, t))
                write_probe_csv(csv_path, rows)
                bar.update(1)
            del train_f, val_f
    finally:
        bar.close()

    rows = read_probe_csv(csv_path) if csv_path.is_file() else rows
    if not rows:
        raise UserInputError("the probe grid is empty; give at least one block and one timestep", out_dir)
    plot_probe_heatmap(rows, png_path, title=f"pixel-classifier mIoU, DSDM {dsdm_run.name}")
    meta.update(summarize_probe(rows))
    meta.update({"complete": True, "rows": len(rows), "files": {"csv": str(csv_path), "heatmap": str(png_path)}})
    write_json_atomic(json_path, meta)
    return meta
