"""The trainable segmentation model = segmenter + (frozen) DSDM feature extractor, and its record.

:class:`SegmentationModel` keeps the frozen DSDM inside the model, so a segmentation checkpoint is
self-contained (``segment`` needs only the run folder): at inference the features are computed from
the image itself. In training they are passed in (``features=``), read from
:class:`~diffusiondci.segmentation.feature_cache.FeatureCache` for the un-jittered view of the image
(the segmenter alone sees the colour-jittered one). ``segmenter.json`` in the run folder holds
everything needed to rebuild the network (:func:`build_from_record`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..diffusion.schedule import DiffusionSchedule
from ..errors import UserInputError
from ..models.reference_encoder import ReferenceEncoder
from ..models.segmenter import Segmenter
from ..models.unet import DSDMUNet, UNetConfig
from .features import DiffusionFeatureExtractor

__all__ = ["SEG_FORMAT", "SEG_META", "SegmentationModel", "build_from_record"]

SEG_META = "segmenter.json"
SEG_FORMAT = "diffusiondci.segmenter"


class SegmentationModel(nn.Module):
    """``images (N, 3, H, W) in [-1, 1] -> logits (N, C, H, W)``; the DSDM part never trains."""

    def __init__(self, segmenter: Segmenter, features: DiffusionFeatureExtractor | None) -> None:
        super().__init__()
        if segmenter.blocks and features is None:
            raise UserInputError(f"injection {segmenter.injection!r} needs a DSDM (--dsdm RUN)")
        self.segmenter = segmenter
        self.features = features if segmenter.blocks else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.segmenter.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, features: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of ``images``; ``features`` (``{block: (N, C, h, w)}``) replaces the frozen DSDM's
        features of ``images`` when given (e.g. those of the un-jittered view, from the cache)."""
        if features is None and self.features is not None:
            features = self.features(images)
        return self.segmenter(images, features if self.segmenter.blocks else None)


def build_from_record(record: Mapping[str, Any]) -> SegmentationModel:
    """An untrained :class:`SegmentationModel` with the architecture described by ``segmenter.json``."""
    seg_cfg = UNetConfig.from_dict(record["unet"])
    injection = record["injection"]
    features = None
    channels: dict[int, int] = {}
    dsdm = record.get("dsdm")
    if injection != "none":
        if not dsdm:
            raise UserInputError(f"segmenter record: injection {injection!r} without a 'dsdm' section")
        dsdm_net = DSDMUNet(UNetConfig.from_dict(dsdm["unet"]))
        enc = dsdm.get("encoder")
        encoder = ReferenceEncoder(int(enc["embed_dim"]), float(enc["width"])) if enc else None
        schedule = DiffusionSchedule(int(dsdm["num_timesteps"]), dsdm["noise_schedule"])
        # runs recorded before the feature cache drew one noise field per batch position, in float32
        features = DiffusionFeatureExtractor(
            dsdm_net, schedule, encoder, record["blocks"], record["timesteps"], int(record.get("feature_seed", 0)),
            noise=record.get("feature_noise", "batch"), feature_dtype=record.get("feature_dtype", "float32"),
        )
        channels = features.feature_channels()
    segmenter = Segmenter(seg_cfg, injection, channels, int(record.get("kv_size", 16)),
                          caa_window=int(record.get("caa_window", 0)), pos_encoding=record.get("caa_pos", "octave"))
    return SegmentationModel(segmenter, features)
