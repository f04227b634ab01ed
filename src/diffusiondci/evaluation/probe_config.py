"""The probe's settings (``probe:`` section of the presets) and its independent random streams."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserInputError

# independent random streams (derive_seed tags)
TAG_SUBSET, TAG_PIXELS, TAG_FIT, TAG_BASELINE = 1, 2, 3, 4


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


__all__ = ["TAG_BASELINE", "TAG_FIT", "TAG_PIXELS", "TAG_SUBSET", "ProbeConfig"]
