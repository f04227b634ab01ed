"""``diffusiondci train-seg``: the segmentation stage (paper §IV-C2, §V-A3, Tables 5-6, Fig. 6).

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
   batch + cross-entropy) or the paper's pixel cross-entropy (``ce``); Adam with ``lr_warmup``
   linear warm-up steps, then ``lr_schedule`` (``poly`` / ``cosine`` / ``constant``) to
   ``lr_min_ratio`` of the peak at the last planned step.

Validation on the real ``val`` split (mean Dice, mIoU; features of the un-moved images, cached
too) every ``val_every`` steps keeps ``checkpoints/best``; without a ``val`` split (``prepare
--val-fraction 0``: every annotated slide trains) the last checkpoint is the model
(``segmenter.json`` ``training.checkpoint_policy``). At the end that checkpoint is scored on the
``test`` split (``test_metrics.json``).

Variants (config / CLI):

* ``injection``: ``none`` | ``skip`` | ``caa`` (Table 5); ``init``: ``dsdm`` (backbone tensors copied
  from the DSDM, reported in ``init_report.json``) | ``scratch``. ``injection=none, init=scratch``
  without a DSDM is the plain U-Net baseline (same backbone, same harness, same budget).
* ``synthetic``: a folder written by ``diffusiondci sample``; ``synthetic_ratio`` R adds
  ``round(R x real training images)`` of its pairs (drawn with ``seed``); ``filter_threshold`` keeps
  only pairs on which a segmenter trained on real data (``filter_model``) reaches that mean Dice
  against the conditioning mask (the paper's clinicians, automated); kept / dropped counts go to
  ``synthetic.json``. Validation and test use real images only.
* ``labelled`` N / ``label_seed``: keep the labels of only N annotated training images (drawn
  reproducibly from the train split, which is disjoint by patient / slide from val and test) to
  simulate a small annotation budget. ``label_unit`` says what one of the N is: ``slide`` (default:
  a source slide / image and every patch cut from it, what a pathologist annotates) or ``patch``.
  Unlabelled patches never enter the supervised loss (``labelled_only``).

Resumable exactly (:class:`~diffusiondci.train.loop.Trainer`), DDP-ready through ``torchrun``.
The run folder records the training data's colour-normalisation target and ROI geometry
(``segmenter.json``), so ``segment`` normalises a new slide exactly as the training data was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from .. import __version__
from ..data.augment import AUGMENTATIONS, dihedral
from ..data.imageio import write_json_atomic
from ..data.patch_dataset import PatchDataset
from ..errors import UserInputError
from ..evaluation.metrics import MetricAccumulator
from ..models.segmenter import INJECTIONS, Segmenter, init_from_dsdm, segmenter_unet_config
from ..models.unet import NUM_MASK_CLASSES
from ..runs.seeds import derive_seed
from ..segmentation.feature_cache import FeatureCache
from ..segmentation.features import FEATURE_DTYPES, DiffusionFeatureExtractor
from ..segmentation.model import SEG_FORMAT, SEG_META, SegmentationModel
from ..segmentation.run import load_segmenter
from . import distributed as dist_utils
from .data_order import steps_per_epoch
from .dsdm import UNET_PRESETS
from .loop import Trainer
from .lr_schedule import LR_SCHEDULES, make_lr_scheduler
from .run_config import preflight_run_folder

__all__ = [
    "SegConfig",
    "augment_batch",
    "augment_views",
    "make_loss",
    "choose_labelled",
    "labelled_groups",
    "predict_dataset",
    "synthetic_subset",
    "train_seg",
]

INITS = ("dsdm", "scratch")
LABEL_UNITS = ("slide", "patch")
LOSSES = ("ce", "dice_ce")
#: ``val_metric`` -> the logged validation score that picks ``checkpoints/best``: the mean Dice of
#: the pooled confusion matrix of the val split (``dataset``) or the mean of per-image mean Dice
#: (``image``, where a class wrongly predicted in a one-class patch scores 0: much noisier).
VAL_METRICS = {"dataset": "dice_dataset", "image": "dice"}


@dataclass
class SegConfig:
    """Settings of ``train-seg`` (section ``seg`` of the presets; paper: Adam 1e-3, batch 12, 200 epochs)."""

    injection: str = "caa"
    init: str = "dsdm"
    unet: str = "tiny"
    blocks: list[int] = field(default_factory=lambda: [1, 2, 3])
    timesteps: list[int] = field(default_factory=lambda: [100])
    kv_size: int = 16
    caa_window: int = 3  # local CAA over w x w DSDM positions around each pixel; 0: global CAA (kv_size)
    loss: str = "dice_ce"  # ce | dice_ce
    lr: float = 1e-3
    lr_schedule: str = "poly"  # constant | cosine | poly (after lr_warmup linear warm-up steps)
    lr_warmup: int = 50
    lr_min_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 12
    steps: int | None = 300
    epochs: int | None = None
    val_every: int | None = 50
    val_metric: str = "dataset"  # dataset (pooled Dice of the val split) | image (mean per-image Dice)
    augment: str = "dihedral"  # none | hflip | dihedral (image, mask and the DSDM's view together)
    scale_range: list[float] = field(default_factory=lambda: [0.9, 1.1])  # random zoom; [1, 1]: off
    jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    synthetic_ratio: float = 0.0
    filter_threshold: float | None = None
    labelled: int | None = None
    label_seed: int = 0
    label_unit: str = "slide"  # what --labelled counts: slide (source image) | patch
    feature_seed: int = 0
    feature_dtype: str = "float16"  # precision the DSDM features are rounded to and cached in
    feature_batch: int = 4  # images per frozen-DSDM forward (fixed: cached = recomputed, bit for bit)
    feature_cache: str = "dsdm"  # dsdm (<dsdm run>/feature_cache) | off | a folder
    feature_cache_gb: float = 8.0  # bound on the cache folder (least recently used files go first)
    log_every: int = 10
    ckpt_every: int = 100
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.injection not in INJECTIONS:
            raise UserInputError(f"seg.injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.init not in INITS:
            raise UserInputError(f"seg.init must be one of {INITS}, got {self.init!r}")
        if self.unet not in UNET_PRESETS:
            raise UserInputError(f"seg.unet must be one of {sorted(UNET_PRESETS)}, got {self.unet!r}")
        self.blocks = [int(b) for b in self.blocks]
        self.timesteps = [int(t) for t in self.timesteps]
        if self.injection != "none" and (not self.blocks or not self.timesteps):
            raise UserInputError("seg.blocks and seg.timesteps must not be empty with feature injection")
        if self.steps is None and self.epochs is None:
            raise UserInputError("give seg.steps or seg.epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise UserInputError(f"seg.steps and seg.epochs must be >= 1, got steps {self.steps}, epochs {self.epochs}")
        if self.synthetic_ratio < 0:
            raise UserInputError(f"seg.synthetic_ratio must be >= 0, got {self.synthetic_ratio}")
        if self.labelled is not None and self.labelled < 1:
            raise UserInputError(f"--labelled must be >= 1, got {self.labelled}")
        if self.label_unit not in LABEL_UNITS:
            raise UserInputError(f"seg.label_unit must be one of {LABEL_UNITS}, got {self.label_unit!r}")
        if not 0.0 <= self.jitter_p <= 1.0:
            raise UserInputError("seg.jitter_p must lie in [0, 1]")
        choices = {"loss": LOSSES, "lr_schedule": LR_SCHEDULES, "augment": AUGMENTATIONS,
                   "feature_dtype": tuple(FEATURE_DTYPES), "val_metric": tuple(VAL_METRICS)}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise UserInputError(f"seg.{name} must be one of {options}, got {getattr(self, name)!r}")
        self.scale_range = [float(v) for v in self.scale_range]
        if len(self.scale_range) != 2 or not 0.0 < self.scale_range[0] <= self.scale_range[1]:
            raise UserInputError(f"seg.scale_range must be [low, high] with 0 < low <= high, got {self.scale_range}")
        if self.lr_warmup < 0 or not 0.0 <= self.lr_min_ratio <= 1.0:
            raise UserInputError("seg.lr_warmup must be >= 0 and seg.lr_min_ratio in [0, 1]")
        if self.caa_window < 0 or (self.caa_window and self.caa_window % 2 == 0):
            raise UserInputError(f"seg.caa_window must be 0 (global CAA) or odd (local CAA), got {self.caa_window}")
        if self.feature_cache_gb <= 0:
            raise UserInputError(f"seg.feature_cache_gb must be > 0, got {self.feature_cache_gb}")
        for name in ("batch_size", "kv_size", "log_every", "ckpt_every", "feature_batch"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"seg.{name} must be >= 1")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def choose_labelled(ids: list[str], n: int | None, seed: int, groups: list[str] | None = None) -> list[int]:
    """Indices of the items of ``ids`` that keep their label: ``n`` of them drawn with ``seed``, or,
    when ``groups`` (one group per item, e.g. its source slide) is given, every item of ``n`` drawn
    groups. All when ``n`` is None.

    The draw depends only on the sorted ids (groups) and the seed, so the same dataset and seed always
    give the same set, whatever the manifest order.
    """
    if n is None:
        return list(range(len(ids)))
    if groups is not None:
        names = sorted(set(groups))
        if n > len(names):
            raise UserInputError(
                f"--labelled {n} asks for more labelled training slides than the {len(names)} there are")
        rng = np.random.default_rng(derive_seed(seed, 11))
        picked = {names[int(i)] for i in rng.choice(len(names), size=n, replace=False)}
        return [i for i, g in enumerate(groups) if g in picked]
    if n > len(ids):
        raise UserInputError(f"--labelled {n} asks for more labelled training images than the {len(ids)} there are")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    rng = np.random.default_rng(derive_seed(seed, 11))
    picked = rng.choice(len(order), size=n, replace=False)
    return sorted(order[int(i)] for i in picked)


def labelled_groups(dataset: PatchDataset, unit: str) -> list[str] | None:
    """The group of every item for :func:`choose_labelled` under ``label_unit`` ``unit``."""
    if unit == "patch":
        return None
    return [r.get("slide") or r["id"] for r in dataset.rows]


def synthetic_subset(
    synthetic: PatchDataset, n_real: int, ratio: float, seed: int, keep: list[int] | None = None
) -> list[int]:
    """Indices of ``round(ratio * n_real)`` synthetic pairs (from ``keep`` if filtered), seeded."""
    pool = list(range(len(synthetic))) if keep is None else list(keep)
    want = int(round(ratio * n_real))
    if want > len(pool):
        raise UserInputError(
            f"--synthetic-ratio {ratio} needs {want} synthetic pairs ({ratio} x {n_real} real images) but "
            f"only {len(pool)} are available{' after filtering' if keep is not None else ''}; "
            "sample more with `diffusiondci sample --num-samples K` or lower the ratio",
            synthetic.root,
        )
    rng = np.random.default_rng(derive_seed(seed, 13))
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=want, replace=False))


class _Pairs(Dataset):
    """Image + mask items with a common layout (``image``, ``mask``, ``synthetic``)."""

    def __init__(self, base: Dataset, synthetic: bool):
        self.base, self.synthetic = base, synthetic

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        return {"image": item["image"], "mask": item["mask"], "synthetic": self.synthetic}


# --------------------------------------------------------------------------------------------
# augmentation (paper §V-A3, plus dihedral moves and zoom) and loss
# --------------------------------------------------------------------------------------------


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


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits (N, C, H, W), labels (N, H, W) -> loss``: ``ce`` (the paper's pixel cross-entropy) or
    ``dice_ce`` = MONAI ``DiceCELoss`` (softmax, background included, labels one-hot; the soft Dice
    of each class pooled over the batch, averaged over classes, plus the mean cross-entropy)."""
    if name == "ce":
        return F.cross_entropy
    if name != "dice_ce":
        raise UserInputError(f"seg.loss must be one of {LOSSES}, got {name!r}")
    dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, batch=True)
    return lambda logits, labels: dice_ce(logits, labels[:, None])


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _dsdm_section(dsdm_run: Path, dsdm_model, schedule, info) -> dict[str, Any]:
    enc = info.encoder
    return {
        "source_run": str(dsdm_run.resolve()),
        "checkpoint": str(info.checkpoint),
        "step": info.step,
        "unet": dsdm_model.config.to_dict(),
        "num_timesteps": schedule.num_timesteps,
        "noise_schedule": schedule.schedule_name,
        "encoder": {"embed_dim": enc.embed_dim, "width": enc.width} if enc is not None else None,
    }


def check_blocks(blocks: list[int], num_blocks: int, dsdm_run: Path) -> None:
    """The injected decoder blocks must exist in the DSDM: a preset's default blocks belong to the
    U-Net depth of that preset, so a DSDM of another depth needs other ones (a clear error, not an
    index error deep inside the network)."""
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise UserInputError(
            f"blocks {blocks} (--blocks, or seg.blocks of the preset) include {bad}, which this DSDM lacks: its "
            f"U-Net depth gives decoder blocks 0..{num_blocks - 1}; pass --blocks with blocks in that range "
            "(`diffusiondci probe` ranks them)", dsdm_run)


def build_model(
    cfg: SegConfig, image_size: int, dsdm_run: Path | None
) -> tuple[SegmentationModel, dict[str, Any], dict[str, Any] | None]:
    """The segmentation model, its architecture record and the DSDM initialisation report."""
    from ..diffusion.dsdm_run import load_dsdm

    if dsdm_run is None:
        if cfg.injection != "none" or cfg.init == "dsdm":
            raise UserInputError(
                f"--injection {cfg.injection} --init {cfg.init} needs --dsdm RUN; without a DSDM use "
                "--injection none --init scratch (the plain U-Net baseline)"
            )
        unet_cfg = segmenter_unet_config(UNET_PRESETS[cfg.unet](image_size=image_size), NUM_MASK_CLASSES)
        torch.manual_seed(cfg.seed)
        model = SegmentationModel(Segmenter(unet_cfg, "none"), None)
        record = {"unet": unet_cfg.to_dict(), "injection": "none", "blocks": [], "timesteps": [], "dsdm": None}
        return model, record, None

    dsdm, schedule, info = load_dsdm(dsdm_run, checkpoint="latest", ema=True, device="cpu")
    if dsdm.config.image_size != image_size:
        raise UserInputError(
            f"the DSDM was trained on {dsdm.config.image_size} px patches, the dataset has {image_size} px", dsdm_run
        )
    unet_cfg = segmenter_unet_config(dsdm.config, NUM_MASK_CLASSES)
    features = None
    channels: dict[int, int] = {}
    if cfg.injection != "none":
        check_blocks(cfg.blocks, dsdm.num_decoder_blocks, dsdm_run)
        features = DiffusionFeatureExtractor(dsdm, schedule, info.encoder, cfg.blocks, cfg.timesteps, cfg.feature_seed,
                                             noise="shared", feature_dtype=cfg.feature_dtype)
        channels = features.feature_channels()
    torch.manual_seed(cfg.seed)
    segmenter = Segmenter(unet_cfg, cfg.injection, channels, cfg.kv_size, caa_window=cfg.caa_window,
                          pos_encoding="nyquist")
    report = init_from_dsdm(segmenter, dsdm.state_dict()) if cfg.init == "dsdm" else None
    record = {
        "unet": unet_cfg.to_dict(),
        "injection": cfg.injection,
        "blocks": features.blocks if features is not None else [],
        "timesteps": features.timesteps if features is not None else [],
        "kv_size": cfg.kv_size,
        "caa_window": cfg.caa_window,
        "caa_pos": "nyquist",
        "feature_seed": cfg.feature_seed,
        "feature_noise": "shared",
        "feature_dtype": cfg.feature_dtype,
        "dsdm": _dsdm_section(dsdm_run, dsdm, schedule, info) if features is not None else None,
        "init_from": str(dsdm_run.resolve()) if cfg.init == "dsdm" else None,
    }
    return SegmentationModel(segmenter, features), record, report


# --------------------------------------------------------------------------------------------
# prediction / validation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 16,
    features: Callable[[torch.Tensor], Mapping[int, torch.Tensor]] | None = None,
) -> MetricAccumulator:
    """Scores of ``model`` on every item of ``dataset`` (``image``, ``mask``); ``features(images)``,
    if given, supplies the DSDM features (``model(images, features)``, e.g. from the cache)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    acc = MetricAccumulator(NUM_MASK_CLASSES)
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(dev)
        logits = model(x, features(x)) if features is not None else model(x)
        acc.update(logits.argmax(1).cpu().numpy(), torch.stack([it["mask"] for it in items]).numpy())
    model.train(was)
    return acc


def _filter_synthetic(
    synthetic: PatchDataset, filter_model: Path, threshold: float, device: torch.device
) -> tuple[list[int], list[dict[str, Any]]]:
    run = load_segmenter(filter_model, device=device)
    kept: list[int] = []
    rows: list[dict[str, Any]] = []
    for start in range(0, len(synthetic), 16):
        idx = list(range(start, min(len(synthetic), start + 16)))
        items = [synthetic[i] for i in idx]
        pred = run.predict(torch.stack([it["image"] for it in items]).to(device)).argmax(1).cpu()
        for i, it, p in zip(idx, items, pred):
            acc = MetricAccumulator(NUM_MASK_CLASSES)
            acc.update(p.numpy(), it["mask"].numpy())
            dice = acc.compute()["mean_dice"]
            ok = dice is not None and dice >= threshold
            rows.append({"id": it["id"], "mean_dice": dice, "kept": bool(ok)})
            if ok:
                kept.append(i)
    return kept, rows


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def feature_cache(cfg: SegConfig, model: SegmentationModel, dsdm_run: Path | None) -> FeatureCache | None:
    """The frozen DSDM's feature cache of this run (None without injection); ``feature_cache``:
    ``dsdm`` = ``<dsdm run>/feature_cache``, ``off`` = computed at every use, else a folder."""
    if model.features is None:
        return None
    where = str(cfg.feature_cache)
    if where == "off":
        root = None
    elif where == "dsdm":
        assert dsdm_run is not None
        root = dsdm_run / "feature_cache"
    else:
        root = Path(where).expanduser()
    return FeatureCache(model.features, root, int(cfg.feature_cache_gb * 1e9), cfg.feature_batch)


def _data_record(dataset: PatchDataset, image_size: int) -> dict[str, Any]:
    meta = dataset.meta
    params = meta.get("parameters") or {}
    return {
        "path": str(dataset.root.resolve()),
        "patch_size": image_size,
        # slide pixels per patch side: ``segment`` reads windows of this size (None: patches were imported 1:1)
        "roi_size": params.get("roi_size"),
        "classes": meta.get("classes"),
        # the colour target of the training data: ``segment`` maps new slides to it
        "color_norm": meta.get("color_norm"),
    }


def train_seg(
    data: str | Path,
    run_dir: str | Path,
    cfg: SegConfig,
    dsdm_run: str | Path | None = None,
    synthetic: str | Path | None = None,
    filter_model: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    evaluate_test: bool = True,
) -> Path:
    """Train a segmenter on dataset ``data`` into ``run_dir`` (see the module docstring)."""
    data, run_dir = Path(data), Path(run_dir)
    preflight_run_folder(run_dir, "seg", resume)  # a wrong --out / --resume fails before any work
    dsdm_path = Path(dsdm_run) if dsdm_run is not None else None
    real = PatchDataset(data, splits=("train",), with_masks=True, labelled_only=True)
    if len(real) == 0:
        raise UserInputError("the dataset has no labelled training patches", data)
    val = PatchDataset(data, splits=("val",), with_masks=True, labelled_only=True)
    image = real[0]["image"]
    image_size = int(image.shape[-1])
    if image.shape[-1] != image.shape[-2]:
        raise UserInputError("patches must be square", real.image_path(0))

    chosen = choose_labelled(real.ids, cfg.labelled, cfg.label_seed, labelled_groups(real, cfg.label_unit))
    real_train: Dataset = Subset(real, chosen) if cfg.labelled is not None else real
    n_real = len(chosen)

    info = dist_utils.init_distributed(device)
    synth_record: dict[str, Any] | None = None
    parts: list[Dataset] = [_Pairs(real_train, synthetic=False)]
    if cfg.synthetic_ratio > 0:
        if synthetic is None:
            raise UserInputError("--synthetic-ratio > 0 needs --synthetic DIR (the output of `diffusiondci sample`)")
        synth = PatchDataset(synthetic, splits=None, with_masks=True, labelled_only=True)
        if len(synth) and int(synth[0]["image"].shape[-1]) != image_size:
            raise UserInputError(f"synthetic patches are not {image_size} px like the real ones", synth.image_path(0))
        keep, filter_rows = None, None
        if filter_model is not None and cfg.filter_threshold is None:
            raise UserInputError("--filter-model needs --filter-threshold (the mean Dice a pair must reach)")
        if cfg.filter_threshold is not None:
            if filter_model is None:
                raise UserInputError("--filter-threshold needs --filter-model RUN (a segmenter trained on real data)")
            keep, filter_rows = _filter_synthetic(synth, Path(filter_model), cfg.filter_threshold, info.device)
        picked = synthetic_subset(synth, n_real, cfg.synthetic_ratio, cfg.seed, keep)
        parts.append(_Pairs(Subset(synth, picked), synthetic=True))
        synth_record = {
            "folder": str(Path(synthetic).resolve()),
            "available": len(synth),
            "filter_threshold": cfg.filter_threshold,
            "filter_model": str(Path(filter_model).resolve()) if filter_model and keep is not None else None,
            "kept": len(keep) if keep is not None else len(synth),
            "dropped": len(synth) - len(keep) if keep is not None else 0,
            "used": len(picked),
            "ratio": cfg.synthetic_ratio,
            "real": n_real,
            "used_ids": [synth.ids[i] for i in picked],
            "filter": filter_rows,
        }
    train_set: Dataset = ConcatDataset(parts) if len(parts) > 1 else parts[0]

    model, record, init_report = build_model(cfg, image_size, dsdm_path)
    batch_size = min(cfg.batch_size, len(train_set))  # type: ignore[arg-type]
    per_epoch = steps_per_epoch(len(train_set), batch_size, info.world_size)  # type: ignore[arg-type]
    total_steps = cfg.steps if cfg.steps is not None else int(cfg.epochs or 0) * max(per_epoch, 1)
    val_every = cfg.val_every or max(per_epoch, 1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_lr_scheduler(optimizer, cfg.lr_schedule, total_steps, cfg.lr_warmup, cfg.lr_min_ratio)
    aug_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, info.rank, 17))
    loss_fn = make_loss(cfg.loss)
    cache = feature_cache(cfg, model, dsdm_path)

    def view_features(views: torch.Tensor, states: list[int]) -> Mapping[int, torch.Tensor]:
        assert cache is not None
        return cache.features(views)  # keyed by the view itself: dihedral(image, k), un-jittered

    def step_fn(m: nn.Module, batch: dict, step: int) -> dict:
        before = dict(cache.stats) if cache is not None else None
        x, y, feats = augment_views(batch["image"], batch["mask"], cfg, aug_gen,
                                    view_features if cache is not None else None)
        loss = loss_fn(m(x, feats) if feats is not None else m(x), y)
        out = {"loss": loss, "synthetic_fraction": batch["synthetic"].float().mean()}
        if cache is not None and before is not None:
            out["feature_hits"] = (cache.stats["hits"] - before["hits"]) / max(len(batch["image"]), 1)
        return out

    def val_fn(m: nn.Module, step: int) -> dict:
        if len(val) == 0:
            return {}
        fetch = cache.features if cache is not None else None
        scores = predict_dataset(m, val, features=fetch).compute()
        pooled = scores["dataset"]
        return {"dice": scores["mean_dice"] or 0.0, "miou": scores["mean_iou"] or 0.0,
                "dice_dataset": pooled["mean_dice"] or 0.0, "miou_dataset": pooled["mean_iou"] or 0.0}

    config = {
        "stage": "seg",
        "data": str(data.resolve()),
        "dsdm": str(dsdm_path.resolve()) if dsdm_path is not None else None,
        "synthetic": str(Path(synthetic).resolve()) if synthetic is not None and cfg.synthetic_ratio > 0 else None,
        "filter_model": str(Path(filter_model).resolve()) if filter_model is not None else None,
        # where the feature cache lives and its bound change no result: a resumed run may move it
        **{k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("steps", "epochs", "num_workers", "feature_cache", "feature_cache_gb")},
    }
    trainer = Trainer(
        run_dir, model, optimizer, train_set, batch_size, step_fn, total_steps, seed=cfg.seed, config=config,
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, val_fn=val_fn if len(val) else None,
        val_every=val_every, best_key=VAL_METRICS[cfg.val_metric] if len(val) else None, best_mode="max",
        val_use_ema=False,
        resume=resume, device=device, num_workers=cfg.num_workers, progress=progress,
        generators={"seg_augment": aug_gen}, scheduler=scheduler,
    )
    if trainer.is_main:
        seg_record = {
            "format": SEG_FORMAT,
            "diffusiondci_version": __version__,
            **record,
            "num_classes": NUM_MASK_CLASSES,
            "data": _data_record(real, image_size),
            "training": {
                "steps": total_steps, "batch_size": batch_size, "labelled": cfg.labelled,
                "label_seed": cfg.label_seed, "label_unit": cfg.label_unit, "num_labelled": n_real,
                "labelled_ids": [real.ids[i] for i in chosen] if cfg.labelled is not None else None,
                "synthetic_used": synth_record["used"] if synth_record else 0,
                "loss": cfg.loss, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "lr_warmup": cfg.lr_warmup,
                "augment": cfg.augment, "scale_range": cfg.scale_range,
                # best on the val split when there is one, else the last step (prepare --val-fraction 0)
                "checkpoint_policy": f"best_val_{VAL_METRICS[cfg.val_metric]}" if len(val) else "last",
            },
            "feature_cache": ({"folder": str(cache.folder), "settings": cache.settings}
                              if cache is not None and cache.folder is not None else None),
        }
        write_json_atomic(run_dir / SEG_META, seg_record, sort_keys=True)
        if init_report is not None:
            write_json_atomic(run_dir / "init_report.json", init_report)
        if synth_record is not None:
            write_json_atomic(run_dir / "synthetic.json", synth_record)
    dist_utils.barrier()
    trainer.fit()
    if evaluate_test and trainer.is_main:
        evaluate_run(run_dir, data, split="test", device=trainer.device)
    dist_utils.barrier()
    return run_dir


def evaluate_run(run_dir: str | Path, data: str | Path, split: str = "test", device=None) -> dict[str, Any] | None:
    """Score the run's best checkpoint (latest if none) on ``split`` of ``data``; writes ``<split>_metrics.json``."""
    ds = PatchDataset(data, splits=(split,), with_masks=True, labelled_only=True)
    if len(ds) == 0:
        return None
    run = load_segmenter(run_dir, device=device)
    scores = predict_dataset(run.model, ds).compute()
    scores["split"] = split
    scores["checkpoint"] = str(run.checkpoint)
    write_json_atomic(Path(run_dir) / f"{split}_metrics.json", scores)
    return scores
