"""A trained segmentation run, ready for inference (``segment``, ``evaluate``, synthetic filtering).

:func:`load_segmenter` rebuilds the network from ``segmenter.json`` and the safetensors weights of
the best checkpoint (the frozen DSDM travels inside it) and exposes what whole-slide inference
needs: the patch size, the slide pixels per patch side (``roi_size``) and the colour-normalisation
record of the training data (so new slides are normalised exactly as the training patches were).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..train.segmentation import load_model_weights
from .model import SegmentationModel

__all__ = ["SegmenterRun", "load_segmenter"]


@dataclass
class SegmenterRun:
    run_dir: Path
    model: SegmentationModel
    record: dict[str, Any]
    checkpoint: Path
    device: torch.device

    @property
    def patch_size(self) -> int:
        return int(self.record["data"]["patch_size"])

    @property
    def roi_size(self) -> int | None:
        roi = self.record["data"].get("roi_size")
        return int(roi) if roi else None

    @property
    def color_norm(self) -> dict[str, Any] | None:
        return self.record["data"].get("color_norm")

    @property
    def num_classes(self) -> int:
        return int(self.record.get("num_classes", 3))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h, w)`` float in [-1, 1] -> ``(N, num_classes, h, w)`` logits (on ``images``' device)."""
        out = self.model(images.to(self.device, torch.float32))
        return out.to(images.device)


def load_segmenter(
    run_dir: str | Path, checkpoint: str = "best", device: str | torch.device | None = None
) -> SegmenterRun:
    """Load a ``train-seg`` run folder (``checkpoint``: best (falls back to latest), latest, step_<N>)."""
    dev = resolve_device(device)
    model, record, resolved = load_model_weights(run_dir, checkpoint)
    model.to(dev).eval()
    return SegmenterRun(run_dir=Path(run_dir), model=model, record=record, checkpoint=resolved, device=dev)
