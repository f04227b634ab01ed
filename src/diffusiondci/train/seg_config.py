"""The settings of ``diffusiondci train-seg``: :class:`SegConfig` (section ``seg`` of the presets)
and the values its choices may take.

Variants (config / CLI):

* ``injection``: ``none`` | ``skip`` | ``caa`` (Table 5); ``init``: ``dsdm`` (backbone tensors copied
  from the DSDM, reported in ``init_report.json``) | ``scratch``. ``injection=none, init=scratch``
  without a DSDM is the plain U-Net baseline (same backbone, same harness, same budget).
* ``synthetic_ratio``, ``filter_threshold``: synthetic pairs (:mod:`diffusiondci.train.seg_data`).
* ``labelled``, ``label_seed``, ``label_unit``: a small annotation budget
  (:mod:`diffusiondci.train.seg_data`).
* ``augment``, ``jitter_p``, ``scale_range``, ``loss``, ``class_weights``: the augmentation and loss recipe
  (:mod:`diffusiondci.train.seg_augment`).
* ``tta``: test-time augmentation (:mod:`diffusiondci.segmentation.tta`) of the final test scoring,
  recorded in ``segmenter.json`` as the default of ``segment``; validation during training uses one view.
* ``autocast``: ``auto`` trains (and validates) in bf16 autocast where the hardware computes bf16
  natively (about 1.5x the steps per second on an AVX512-BF16 CPU), else fp32; ``fp32`` always.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.augment import AUGMENTATIONS
from ..device import AUTOCAST_CHOICES
from ..errors import UserInputError
from ..models.segmenter import INJECTIONS
from ..segmentation.features import FEATURE_DTYPES
from ..segmentation.tta import TTA_MODES
from .dsdm import UNET_PRESETS
from .lr_schedule import LR_SCHEDULES

INITS = ("dsdm", "scratch")
LABEL_UNITS = ("slide", "patch")
LOSSES = ("ce", "dice_ce")
#: ``class_weights``: ``none`` (every class weighs 1) | ``balanced`` (median-frequency weights of the
#: labelled training masks; :func:`diffusiondci.train.seg_augment.class_weights`)
CLASS_WEIGHTS = ("none", "balanced")
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
    class_weights: str = "none"  # none | balanced (median-frequency weights of the training masks)
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
    tta: str = "dihedral"  # test-time augmentation of the test scoring and `segment`: none | flip | dihedral
    autocast: str | None = "auto"  # auto | bf16 | fp32 (None = fp32); see diffusiondci.device.resolve_autocast
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
        choices = {"loss": LOSSES, "class_weights": CLASS_WEIGHTS, "lr_schedule": LR_SCHEDULES, "augment": AUGMENTATIONS,
                   "feature_dtype": tuple(FEATURE_DTYPES), "val_metric": tuple(VAL_METRICS),
                   "autocast": (None, *AUTOCAST_CHOICES), "tta": tuple(TTA_MODES)}
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
