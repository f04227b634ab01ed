"""A trained segmentation run, ready for inference (``segment``, ``evaluate``, synthetic filtering).

:func:`load_segmenter` rebuilds the network from ``segmenter.json`` (:func:`load_record`) and the
safetensors weights of the best checkpoint (:func:`load_model_weights`) (the frozen DSDM travels inside it) and exposes what whole-slide inference
needs: the patch size, the slide pixels per patch side (``roi_size``) and the colour-normalisation
record of the training data (so new slides are normalised exactly as the training patches were).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..runs.checkpoint import find_checkpoint
from ..runs.record import read_run_record
from ..runs.weights import load_weights_safetensors
from .model import SEG_FORMAT, SEG_META, SegmentationModel, build_from_record
from .tta import predict_with_tta, tta_views

__all__ = ["SegmenterRun", "load_model_weights", "load_record", "load_segmenter"]


@dataclass
class SegmenterRun:
    run_dir: Path
    model: SegmentationModel
    record: dict[str, Any]
    checkpoint: Path
    device: torch.device
    #: test-time augmentation of :meth:`predict` (``none`` | ``flip`` | ``dihedral``); None: the run's
    #: own (``segmenter.json`` ``tta``; ``none`` for runs recorded before it existed)
    tta_override: str | None = None

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

    @property
    def tta(self) -> str:
        """The test-time augmentation :meth:`predict` uses (:mod:`diffusiondci.segmentation.tta`)."""
        return self.tta_override or str(self.record.get("tta", "none"))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h, w)`` float in [-1, 1] -> ``(N, num_classes, h, w)`` logits (on ``images``' device);
        under test-time augmentation (:attr:`tta`), the log of the view-averaged class probabilities."""
        out = predict_with_tta(self.model, images.to(self.device, torch.float32), self.tta)
        return out.to(images.device)


def load_record(run_dir: str | Path) -> dict[str, Any]:
    """``segmenter.json`` of a ``train-seg`` run, checked."""
    return read_run_record(run_dir, SEG_META, SEG_FORMAT, "segmentation", "train-seg")


def load_model_weights(run_dir: str | Path, checkpoint: str = "best") -> tuple[SegmentationModel, dict, Path]:
    """Rebuild the network from ``segmenter.json`` and load a checkpoint (``best``, else ``latest``)."""
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    resolved = find_checkpoint(run_dir, checkpoint, "train-seg")
    model = build_from_record(record)
    load_weights_safetensors(model, resolved, strict=True)
    return model.eval(), record, resolved


def load_segmenter(
    run_dir: str | Path, checkpoint: str = "best", device: str | torch.device | None = None, tta: str | None = None,
) -> SegmenterRun:
    """Load a ``train-seg`` run folder (``checkpoint``: best (falls back to latest), latest, step_<N>);
    ``tta`` replaces the run's test-time augmentation (:mod:`diffusiondci.segmentation.tta`)."""
    if tta is not None:
        tta_views(tta)
    dev = resolve_device(device)
    model, record, resolved = load_model_weights(run_dir, checkpoint)
    model.to(dev).eval()
    return SegmenterRun(run_dir=Path(run_dir), model=model, record=record, checkpoint=resolved, device=dev,
                        tta_override=tta)
