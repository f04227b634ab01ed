"""The segmentation network of the second stage (paper §IV-C2, Fig. 1 bottom, Fig. 4, Table 5).

Backbone: the DSDM U-Net (:class:`~diffusiondci.models.unet.DSDMUNet`) with plain GroupNorm in
place of SPADE, no reference conditioning and a 3-class output head; the timestep input is fixed
to 0 (a clean image). It can be initialised from a trained DSDM (:func:`init_from_dsdm`).

Injection of the frozen DSDM's features (``injection``):

* ``none``  -- no features: the (denoising-initialised) U-Net alone;
* ``skip``  -- the features of decoder block ``b`` are projected by a zero-initialised 1x1 conv and
  added to the output of the segmenter's block ``b`` (resized if their sizes differ);
* ``caa``   -- Cross-Attention Alignment (Fig. 4): ``h + W_O softmax(Q K^T / sqrt(d)) V`` with ``Q``
  from the segmenter's block output and ``K``, ``V`` from the DSDM features of the same block
  (:class:`~diffusiondci.models.attention.CrossAttentionAlignment`, zero-initialised output so a
  fresh block is the identity).

Two choices the paper leaves open, made here:

* the DSDM feature map is average-pooled to at most ``kv_size x kv_size`` tokens before it becomes
  keys/values: full-resolution context (4096 x 4096 logits at 64 px, 65k x 65k at 256 px) costs far
  more than it brings, since the U-Net's skip path already carries full-resolution detail;
* queries and keys get 2-D sine-cosine positional encodings of their *normalised* position in the
  image, so that a pixel can attend to the DSDM features of the same place although the two grids
  differ in size (cross-attention alone is blind to position).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserInputError
from .attention import CrossAttentionAlignment
from .unet import DSDMUNet, UNetConfig

__all__ = ["INJECTIONS", "Segmenter", "init_from_dsdm", "segmenter_unet_config", "sincos_2d"]

#: ``none`` (no DSDM features), ``skip`` (added), ``caa`` (cross-attention), Table 5.
INJECTIONS = ("none", "skip", "caa")


def segmenter_unet_config(dsdm_config: UNetConfig, num_classes: int = 3) -> UNetConfig:
    """The DSDM's network with GroupNorm instead of SPADE, no MCAA and a ``num_classes`` head."""
    d = dsdm_config.to_dict()
    d.update(decoder_norm="group", use_reference=False, out_channels=int(num_classes))
    return UNetConfig.from_dict(d)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``(h*w, dim)`` sine-cosine encodings of pixel-centre positions normalised to [0, 1].

    Half the channels encode y, half x, each with ``dim // 4`` frequencies; zero-padded to ``dim``.
    """
    quarter = dim // 4
    out = torch.zeros(h * w, dim, device=device)
    if quarter == 0:
        return out
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    freqs = (2.0 ** torch.arange(quarter, device=device, dtype=torch.float32)) * math.pi
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ay = gy.reshape(-1, 1) * freqs
    ax = gx.reshape(-1, 1) * freqs
    out[:, : 4 * quarter] = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return out


class SkipInjection(nn.Module):
    """``h + conv1x1(GN(f))`` (zero-initialised projection), ``f`` resized to ``h``'s size."""

    def __init__(self, channels: int, feature_channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, feature_channels), feature_channels)
        self.proj = nn.Conv2d(feature_channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if f.shape[-2:] != h.shape[-2:]:
            f = F.interpolate(f, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return h + self.proj(self.norm(f.to(h.dtype)))


class CAAInjection(nn.Module):
    """Cross-attention from segmenter features (queries) to DSDM features (keys/values), Fig. 4."""

    def __init__(self, channels: int, feature_channels: int, num_head_channels: int, groups: int,
                 kv_size: int) -> None:
        super().__init__()
        self.kv_size = int(kv_size)
        self.context_norm = nn.LayerNorm(feature_channels)
        self.caa = CrossAttentionAlignment(channels, feature_channels, num_head_channels, groups)

    def forward(self, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        if f.shape[-2] > self.kv_size or f.shape[-1] > self.kv_size:
            f = F.adaptive_avg_pool2d(f, (min(f.shape[-2], self.kv_size), min(f.shape[-1], self.kv_size)))
        fc, fh, fw = f.shape[1:]
        tokens = f.to(h.dtype).flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = self.context_norm(tokens) + sincos_2d(fh, fw, fc, h.device).to(h.dtype)
        return self.caa(h, tokens, query_pos=sincos_2d(hh, ww, c, h.device))


class Segmenter(nn.Module):
    """``(images, {block: DSDM features}) -> (N, num_classes, H, W)`` logits.

    ``feature_channels`` gives the channels of the injected features per decoder block
    (:meth:`~diffusiondci.segmentation.features.DiffusionFeatureExtractor.feature_channels`); it
    is empty for ``injection="none"``.
    """

    def __init__(
        self,
        unet_config: UNetConfig,
        injection: str = "caa",
        feature_channels: Mapping[int, int] | None = None,
        kv_size: int = 16,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise UserInputError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        if unet_config.decoder_norm != "group" or unet_config.use_reference:
            raise UserInputError("the segmenter backbone uses GroupNorm and no reference; use segmenter_unet_config()")
        feature_channels = dict(feature_channels or {})
        if injection != "none" and not feature_channels:
            raise UserInputError(f"injection {injection!r} needs DSDM features: give at least one decoder block")
        self.unet = DSDMUNet(unet_config)
        self.injection = injection
        self.blocks = sorted(int(b) for b in feature_channels) if injection != "none" else []
        shapes = self.unet.decoder_feature_shapes
        groups = unet_config.norm_num_groups
        self.inject = nn.ModuleDict()
        for b in self.blocks:
            if not 0 <= b < len(shapes):
                raise UserInputError(f"decoder block {b} does not exist (0..{len(shapes) - 1})")
            ch = shapes[b][0]
            if injection == "skip":
                self.inject[str(b)] = SkipInjection(ch, feature_channels[b], groups)
            else:
                heads = unet_config.num_head_channels if ch % unet_config.num_head_channels == 0 else ch
                self.inject[str(b)] = CAAInjection(ch, feature_channels[b], heads, groups, kv_size)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.out_channels)

    def forward(self, images: torch.Tensor, features: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        inject = None
        if self.blocks:
            if features is None or any(b not in features for b in self.blocks):
                raise ValueError(f"features for decoder blocks {self.blocks} are required")
            inject = {b: (lambda h, b=b: self.inject[str(b)](h, features[b])) for b in self.blocks}
        t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return self.unet(images, t, inject=inject)


def init_from_dsdm(segmenter: Segmenter, dsdm_state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Copy every DSDM tensor whose name and shape fit the segmenter's backbone.

    Returns a report: ``loaded`` (copied), ``reshaped`` (same name, other shape: left new, e.g. the
    6-channel diffusion head vs the 3-class head), ``new`` (backbone tensors with no DSDM
    counterpart, e.g. decoder GroupNorm affine parameters that replace SPADE, injection layers) and
    ``unused`` (DSDM tensors the segmenter has no place for: SPADE, MCAA).
    """
    target = segmenter.unet.state_dict()
    loaded, reshaped = [], []
    update = {}
    for k, v in dsdm_state.items():
        if k in target:
            if tuple(v.shape) == tuple(target[k].shape):
                update[k] = v
                loaded.append(k)
            else:
                reshaped.append(f"{k}: dsdm {tuple(v.shape)} vs segmenter {tuple(target[k].shape)}")
    segmenter.unet.load_state_dict(update, strict=False)
    new = sorted(set(target) - set(loaded))
    new += [f"inject.{k}" for k in segmenter.inject.state_dict()]
    unused = sorted(set(dsdm_state) - set(target))
    return {
        "loaded": sorted(loaded),
        "reshaped": sorted(reshaped),
        "new": new,
        "unused": unused,
        "counts": {"loaded": len(loaded), "reshaped": len(reshaped), "new": len(new), "unused": len(unused)},
    }
