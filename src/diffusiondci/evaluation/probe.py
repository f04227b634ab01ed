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
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusiondci import NUM_CLASSES

from ..data.imageio import write_json_atomic
from ..data.patch_dataset import PatchDataset
from ..device import resolve_device
from ..errors import UserInputError
from ..segmentation.features import DiffusionFeatureExtractor, paper_probe_timesteps
from ..train.loop import derive_seed
from .metrics import MetricAccumulator

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

CSV_COLUMNS = ("block", "timestep", "miou", "dice", "channels", "resolution")
# independent random streams (derive_seed tags)
_TAG_SUBSET, _TAG_PIXELS, _TAG_FIT, _TAG_BASELINE = 1, 2, 3, 4


@dataclass
class ProbeConfig:
    """Settings of the probe (``probe:`` section of the presets) and of the pixel-classifier baseline."""

    blocks: list[int] | None = None  # decoder blocks probed; None = all of the DSDM's
    timesteps: list[int] | None = None  # 0-based; None = paper_probe_timesteps(T)
    train_images: int = 24  # labelled train-split images the classifiers learn from
    val_images: int = 12  # val-split images they are scored on
    pixels_per_image: int | None = 1024  # training pixels sampled per image (None/0 = all)
    steps: int = 200  # Adam steps per classifier
    batch_pixels: int = 1024  # pixels per mini-batch
    hidden: list[int] = field(default_factory=lambda: [128, 32])  # ddpm-segmentation: dim -> 128 -> 32 -> C
    lr: float = 1e-3
    seed: int = 0
    batch_size: int = 8  # images per DSDM forward

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"probe {name} must be >= 1, got {getattr(self, name)}")
        if int(self.batch_pixels) < 2:
            raise UserInputError(f"probe batch_pixels must be >= 2 (BatchNorm), got {self.batch_pixels}")
        if self.pixels_per_image is not None and int(self.pixels_per_image) < 0:
            raise UserInputError(f"probe pixels_per_image must be >= 0, got {self.pixels_per_image}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise UserInputError(f"probe hidden must be a list of positive widths, got {self.hidden}")
        if self.lr <= 0:
            raise UserInputError(f"probe lr must be > 0, got {self.lr}")
        self.hidden = [int(h) for h in self.hidden]
        self.blocks = None if self.blocks is None else sorted({int(b) for b in self.blocks})
        self.timesteps = None if self.timesteps is None else sorted({int(t) for t in self.timesteps})


# ----------------------------------------------------------------------------- pixel classifier


class PixelClassifier(nn.Module):
    """Per-pixel MLP of ddpm-segmentation: ``(P, C) -> (P, num_classes)`` logits.

    ``Linear -> ReLU -> BatchNorm1d`` per hidden width, then ``Linear(num_classes)``. Inputs are
    first standardised with per-channel ``mean``/``std`` buffers (set by
    :func:`fit_pixel_classifier` from the training pixels), because raw decoder activations of
    different blocks differ in scale by orders of magnitude.
    """

    def __init__(self, in_channels: int, num_classes: int = NUM_CLASSES, hidden: Sequence[int] = (128, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        c = int(in_channels)
        for h in hidden:
            layers += [nn.Linear(c, int(h)), nn.ReLU(), nn.BatchNorm1d(int(h))]
            c = int(h)
        layers.append(nn.Linear(c, int(num_classes)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(int(in_channels)))
        self.register_buffer("std", torch.ones(int(in_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Labels ``(P,)`` (long, on the model's device), in eval mode, ``chunk`` pixels at a time."""
        was_training = self.training
        self.eval()
        dev = self.mean.device
        out = torch.cat([self(x[i:i + chunk].to(dev)).argmax(1) for i in range(0, x.shape[0], chunk)])
        self.train(was_training)
        return out


def _channel_stats(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``(P, C)`` without a full float32 copy."""
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].double()
        s += part.sum(0)
        s2 += part.square().sum(0)
    n = max(x.shape[0], 1)
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def fit_pixel_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    batch: int = 1024,
    hidden: Sequence[int] = (128, 32),
    num_classes: int = NUM_CLASSES,
    device: str | torch.device | None = None,
) -> PixelClassifier:
    """Train a :class:`PixelClassifier` on pixels ``features (P, C)`` with labels ``(P,)``.

    Adam, cross-entropy, ``steps`` mini-batches of ``batch`` pixels drawn uniformly with a seeded
    generator (same inputs + seed = same classifier on one device). ``features`` may be float16 and
    may stay on the CPU; ``device`` (default: the features' device) runs the training. Returns the
    classifier in eval mode.
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"need features (P, C) and labels (P,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if features.shape[0] < 2:
        raise ValueError("need at least 2 training pixels")
    dev = torch.device(device) if device is not None else features.device
    feats = features.to(dev)
    targets = labels.to(dev, torch.long)
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0))
        model = PixelClassifier(features.shape[1], num_classes, hidden)
    model.mean, model.std = _channel_stats(feats)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(derive_seed(seed, 1))
    n = feats.shape[0]
    for _ in range(int(steps)):
        idx = torch.randint(n, (max(2, int(batch)),), generator=gen).to(dev)
        loss = F.cross_entropy(model(feats[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------- data and features


def _subset(n: int, k: int | None, seed: int, tag: int) -> list[int]:
    """A seeded sorted subset of ``range(n)`` of size ``k`` (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(seed, _TAG_SUBSET, tag))
    return sorted(int(i) for i in rng.choice(n, size=int(k), replace=False))


def _load_split(
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


def _load_extractor(dsdm_run: Path, checkpoint: str, device: torch.device, seed: int):
    """The frozen DSDM (EMA weights) as a feature extractor over all decoder blocks, plus its run info."""
    from ..diffusion.pipeline import load_dsdm

    model, schedule, info = load_dsdm(dsdm_run, checkpoint=checkpoint, ema=True, device=device)
    all_blocks = list(range(model.num_decoder_blocks))
    extractor = DiffusionFeatureExtractor(model, schedule, info.encoder, all_blocks, [0], seed=seed)
    return extractor, info


def _with_grid(
    base: DiffusionFeatureExtractor, blocks: Sequence[int], timesteps: Sequence[int],
) -> DiffusionFeatureExtractor:
    """The same frozen networks tapped at other blocks/timesteps (no reload)."""
    return DiffusionFeatureExtractor(base.dsdm, base.schedule, base.encoder, blocks, timesteps, seed=base.seed)


def _check_image_size(images: torch.Tensor, extractor: DiffusionFeatureExtractor, data: Path) -> None:
    h, w = images.shape[-2:]
    size = extractor.image_size
    if (h, w) != (size, size):
        raise UserInputError(
            f"patches are {h}x{w} px but the DSDM was trained on {size}x{size}; "
            "probe it on a dataset of its patch size",
            data,
        )


def _upsample(feat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, h, w) -> (N, C, H, W)`` bilinear (ddpm-segmentation), float32."""
    feat = feat.float()
    if tuple(feat.shape[-2:]) == tuple(size):
        return feat
    return F.interpolate(feat, size=size, mode="bilinear", align_corners=False)


def _pixel_sample(hw: int, k: int | None, seed: int, image_key: int) -> torch.Tensor | None:
    """Fixed flat pixel indices of one training image (None = all pixels)."""
    if not k or k >= hw:
        return None
    rng = np.random.default_rng(derive_seed(seed, _TAG_PIXELS, image_key))
    return torch.from_numpy(np.sort(rng.choice(hw, size=int(k), replace=False)))


def _batches(extractor: DiffusionFeatureExtractor, images: torch.Tensor, batch_size: int,
             device: torch.device) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    for start in range(0, images.shape[0], batch_size):
        yield start, extractor(images[start:start + batch_size].to(device))


def _train_pixels(
    extractor: DiffusionFeatureExtractor, images: torch.Tensor, masks: torch.Tensor,
    samples: list[torch.Tensor | None], batch_size: int, device: torch.device, concat: bool,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Sampled training pixels: ``({block: (P, C) float16}, labels (P,))`` (``concat``: one key -1
    holding every block's upsampled features side by side)."""
    size = tuple(masks.shape[-2:])
    per_block: dict[int, list[torch.Tensor]] = {}
    for start, feats in _batches(extractor, images, batch_size, device):
        for j in range(next(iter(feats.values())).shape[0]):
            idx = samples[start + j]
            ups = [_upsample(feats[b][j:j + 1], size)[0].flatten(1) for b in sorted(feats)]  # each (C, HW)
            cols = [torch.cat(ups, 0)] if concat else ups
            keys = [-1] if concat else sorted(feats)
            for key, col in zip(keys, cols):
                col = col if idx is None else col[:, idx.to(col.device)]
                per_block.setdefault(key, []).append(col.t().to("cpu", torch.float16))
    labels = torch.cat([m.flatten() if s is None else m.flatten()[s] for m, s in zip(masks, samples)])
    return {b: torch.cat(v) for b, v in per_block.items()}, labels


def _val_features(
    extractor: DiffusionFeatureExtractor, images: torch.Tensor, batch_size: int, device: torch.device,
) -> dict[int, torch.Tensor]:
    """Native-resolution features ``{block: (N, C, h, w) float16}`` on the CPU."""
    out: dict[int, list[torch.Tensor]] = {}
    for _, feats in _batches(extractor, images, batch_size, device):
        for b, f in feats.items():
            out.setdefault(b, []).append(f.to("cpu", torch.float16))
    return {b: torch.cat(v) for b, v in out.items()}


def _predict(model: PixelClassifier, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label map ``(H, W)`` of one image from its native features ``(C, h, w)``."""
    dev = model.mean.device
    up = _upsample(feats[None].to(dev), size)[0].flatten(1).t()
    return model.predict(up).view(size).cpu()


def _scores(acc: MetricAccumulator) -> tuple[float, float]:
    res = acc.compute()
    as_float = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return as_float(res["mean_iou"]), as_float(res["mean_dice"])


# ----------------------------------------------------------------------------- results files


def read_probe_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``probe.csv`` with typed values (missing file -> [])."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                rows.append({
                    "block": int(r["block"]), "timestep": int(r["timestep"]),
                    "miou": float(r["miou"]), "dice": float(r["dice"]),
                    "channels": int(r["channels"]), "resolution": r["resolution"],
                })
            except (KeyError, TypeError, ValueError) as exc:
                raise UserInputError(f"unreadable probe row {r} ({exc}); delete the file to start over", path) from None
    return rows


def _write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            for r in sorted(rows, key=lambda r: (r["timestep"], r["block"])):
                writer.writerow({k: r[k] for k in CSV_COLUMNS})
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summarize_probe(rows: list[dict[str, Any]], top: int = 3) -> dict[str, Any]:
    """Best cell, top blocks (mean mIoU over their timesteps), top timesteps (mean over blocks) and
    the ``seg:`` snippet they suggest (the top blocks at the best timestep)."""
    if not rows:
        raise ValueError("no probe results")
    finite = [r for r in rows if not math.isnan(r["miou"])] or rows
    best = max(finite, key=lambda r: r["miou"])  # first maximum in CSV order on ties

    def ranking(key: str) -> list[dict[str, Any]]:
        groups: dict[int, list[float]] = {}
        for r in finite:
            groups.setdefault(r[key], []).append(r["miou"])
        means = [{key: k, "mean_miou": float(np.mean(v)), "count": len(v)} for k, v in groups.items()]
        return sorted(means, key=lambda m: (-m["mean_miou"], m[key]))[:top]

    top_blocks, top_timesteps = ranking("block"), ranking("timestep")
    seg = {"blocks": sorted(m["block"] for m in top_blocks), "timesteps": [top_timesteps[0]["timestep"]]}
    return {
        "best": {k: best[k] for k in ("block", "timestep", "miou", "dice", "channels", "resolution")},
        "top_blocks": top_blocks,
        "top_timesteps": top_timesteps,
        "suggested_config": {"seg": seg},
        "suggested_yaml": f"seg:\n  blocks: {seg['blocks']}\n  timesteps: {seg['timesteps']}\n",
    }


def plot_probe_heatmap(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Blocks x timesteps heat map of the mIoU, each cell annotated (paper Fig. 3); NaN = not run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = sorted({r["block"] for r in rows})
    steps = sorted({r["timestep"] for r in rows})
    grid = np.full((len(blocks), len(steps)), np.nan)
    for r in rows:
        grid[blocks.index(r["block"]), steps.index(r["timestep"])] = r["miou"]
    fig = Figure(figsize=(max(6.0, 2.5 + 0.75 * len(steps)), max(3.5, 2.0 + 0.45 * len(blocks))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[~np.isnan(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mIoU")
    ax.set_xticks(range(len(steps)), labels=[str(t) for t in steps])
    ax.set_yticks(range(len(blocks)), labels=[str(b) for b in blocks])
    ax.set_xlabel("timestep")
    ax.set_ylabel("decoder block")
    ax.set_title(title or "pixel-classifier mIoU of DSDM features", fontsize=10)
    mid = (lo + hi) / 2
    for i in range(len(blocks)):
        for j in range(len(steps)):
            v = grid[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > mid else "white")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_resume(out_dir: Path, key: str, settings: dict[str, Any]) -> None:
    """Refuse to mix cells computed with other settings into this folder's probe.csv."""
    meta_path, csv_path = out_dir / "probe.json", out_dir / "probe.csv"
    if not csv_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    if old.get("settings_key") == key:
        return
    old_settings = old.get("settings") or {}
    diff = [f"{k}: {old_settings.get(k)!r} -> {v!r}" for k, v in settings.items() if old_settings.get(k) != v][:4]
    raise UserInputError(
        "holds a probe with other settings" + (f" ({'; '.join(diff)})" if diff else "")
        + "; choose another --out or delete probe.csv to start over", csv_path,
    )


# ----------------------------------------------------------------------------- the probe


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
    base, info = _load_extractor(dsdm_run, checkpoint, dev, cfg.seed)
    n_blocks, n_t = base.dsdm.num_decoder_blocks, base.schedule.num_timesteps
    blocks = cfg.blocks if cfg.blocks is not None else list(range(n_blocks))
    timesteps = cfg.timesteps if cfg.timesteps is not None else paper_probe_timesteps(n_t)
    _with_grid(base, blocks, timesteps)  # validates the grid (UserInputError on bad blocks/timesteps)

    train_x, train_y, train_ids = _load_split(data, "train", cfg.train_images, cfg.seed, 0)
    val_x, val_y, val_ids = _load_split(data, "val", cfg.val_images, cfg.seed, 1)
    _check_image_size(train_x, base, data)
    size = tuple(train_y.shape[-2:])

    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("blocks", "timesteps")}
    settings = {
        **fixed, "data": str(data.resolve()), "dsdm_run": str(dsdm_run.resolve()),
        "checkpoint": checkpoint, "checkpoint_step": info.step, "num_timesteps": n_t,
        "train_ids": train_ids, "val_ids": val_ids,
    }
    key = _settings_key(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(out_dir, key, settings)
    csv_path, json_path, png_path = out_dir / "probe.csv", out_dir / "probe.json", out_dir / "probe_heatmap.png"
    rows = read_probe_csv(csv_path)
    done = {(r["block"], r["timestep"]) for r in rows}
    todo = [(t, b) for t in timesteps for b in blocks if (b, t) not in done]
    meta = {"settings": settings, "settings_key": key, "grid": {"blocks": blocks, "timesteps": timesteps},
            "complete": False}
    write_json_atomic(json_path, meta)
    if log and done:
        log(f"resuming: {len(done)} cells already in {csv_path}, {len(todo)} to go")

    samples = [_pixel_sample(size[0] * size[1], cfg.pixels_per_image, cfg.seed, i) for i in range(len(train_ids))]
    shapes = base.dsdm.decoder_feature_shapes
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="probe", unit="cell", disable=not progress or None, leave=False)
    try:
        for t in timesteps:
            pending = [b for b in blocks if (b, t) not in done]
            if not pending:
                continue
            extractor = _with_grid(base, pending, [t])
            train_f, labels = _train_pixels(extractor, train_x, train_y, samples, cfg.batch_size, dev, concat=False)
            val_f = _val_features(extractor, val_x, cfg.batch_size, dev)
            for b in pending:
                bar.set_postfix(timestep=t, block=b)
                model = fit_pixel_classifier(train_f[b], labels, cfg.steps, cfg.lr,
                                             derive_seed(cfg.seed, _TAG_FIT, b, t), cfg.batch_pixels, cfg.hidden,
                                             device=dev)
                acc = MetricAccumulator()
                for i in range(val_f[b].shape[0]):
                    acc.update(_predict(model, val_f[b][i], size), val_y[i])
                miou, dice = _scores(acc)
                c, h, w = shapes[b]
                rows.append({"block": b, "timestep": t, "miou": miou, "dice": dice, "channels": c,
                             "resolution": f"{h}x{w}"})
                done.add((b, t))
                _write_csv_atomic(csv_path, rows)
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


# ----------------------------------------------------------------------------- Table 6 baseline


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
    base, info = _load_extractor(dsdm_run, checkpoint, dev, cfg.seed)
    extractor = _with_grid(base, blocks, timesteps)
    train_x, train_y, train_ids = _load_split(data, "train", max_images, cfg.seed, 0)
    _check_image_size(train_x, base, data)
    size = tuple(train_y.shape[-2:])
    samples = [_pixel_sample(size[0] * size[1], cfg.pixels_per_image, cfg.seed, i) for i in range(len(train_ids))]
    feats, labels = _train_pixels(extractor, train_x, train_y, samples, cfg.batch_size, dev, concat=True)
    models = [
        fit_pixel_classifier(feats[-1], labels, cfg.steps, cfg.lr, derive_seed(cfg.seed, _TAG_BASELINE, k),
                             cfg.batch_pixels, cfg.hidden, device=dev)
        for k in range(ensemble)
    ]
    del feats, labels
    test_x, test_y, test_ids = _load_split(data, split, None, cfg.seed, 2)
    acc = MetricAccumulator()
    for start, fmap in _batches(extractor, test_x, cfg.batch_size, dev):
        for j in range(next(iter(fmap.values())).shape[0]):
            up = torch.cat([_upsample(fmap[b][j:j + 1], size)[0] for b in sorted(fmap)]).flatten(1).t()
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
