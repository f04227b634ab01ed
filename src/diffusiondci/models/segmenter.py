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
  (zero-initialised output so a fresh block is the identity). Two forms (``caa_window``):

  - ``caa_window`` = w >= 1 (odd): **local** CAA. The DSDM features are brought to the query grid
    (pixel-aligned: average-pooled if finer, bilinear if coarser) and every query pixel attends to
    the ``w x w`` DSDM positions around its own, with a learned bias per head and offset
    (:class:`LocalCAAInjection`). Nothing has to be learnt to find "the same place": at the start
    the attention is uniform over the window, i.e. the features of the neighbourhood, and the
    content-based weights refine that. Cost ``O(HW w^2)``, affordable at every level.
  - ``caa_window`` = 0: **global** CAA, the first reading of Fig. 4
    (:class:`CAAInjection` around :class:`~diffusiondci.models.attention.CrossAttentionAlignment`):
    the DSDM feature map is average-pooled to at most ``kv_size x kv_size`` tokens (full
    resolution costs ``(HW)^2``: 4096 x 4096 logits per head at 64 px), and queries and keys get
    2-D sine-cosine codes of their normalised position so that attention can find the same place
    in two grids of different size. The codes' frequencies stay below a quarter of the coarser
    grid's sampling rate (``pos_encoding="nyquist"``), so every channel varies over the grid;
    runs recorded before kept the octave ladder (``"octave"``) whose upper channels alias.

Choice made here and not in the paper: the local form is the default of the presets (it learns
faster than global CAA on GlaS; see the ``seg:`` comments in ``configs/tiny.yaml``).
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

__all__ = ["INJECTIONS", "POS_ENCODINGS", "Segmenter", "init_from_dsdm", "segmenter_unet_config", "sincos_2d"]

#: position codes of global CAA: frequencies below the grid's Nyquist limit, or the first octave ladder.
POS_ENCODINGS = ("nyquist", "octave")

#: ``none`` (no DSDM features), ``skip`` (added), ``caa`` (cross-attention), Table 5.
INJECTIONS = ("none", "skip", "caa")


def segmenter_unet_config(dsdm_config: UNetConfig, num_classes: int = 3) -> UNetConfig:
    """The DSDM's network with GroupNorm instead of SPADE, no MCAA and a ``num_classes`` head."""
    d = dsdm_config.to_dict()
    d.update(decoder_norm="group", use_reference=False, out_channels=int(num_classes))
    return UNetConfig.from_dict(d)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None, grid: int | None = None,
              mode: str = "nyquist") -> torch.Tensor:
    """``(h*w, dim)`` sine-cosine encodings of pixel-centre positions normalised to [0, 1].

    Half the channels encode y, half x, each with ``dim // 4`` frequencies; zero-padded to ``dim``.
    ``mode="nyquist"``: frequencies geometrically spaced from 1/2 to ``grid / 4`` cycles per image
    side (``grid``: the coarsest grid the codes must be read on, default ``min(h, w)``), so no code
    aliases on that grid. ``mode="octave"``: ``2^k / 2`` cycles, k = 0, 1, ... (the first version).
    """
    if mode not in POS_ENCODINGS:
        raise ValueError(f"position encoding must be one of {POS_ENCODINGS}, got {mode!r}")
    quarter = dim // 4
    out = torch.zeros(h * w, dim, device=device)
    if quarter == 0:
        return out
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    if mode == "octave":
        freqs = (2.0 ** torch.arange(quarter, device=device, dtype=torch.float32)) * math.pi
    else:
        top = max(float(grid if grid is not None else min(h, w)) / 4.0, 0.5)
        cycles = torch.logspace(math.log10(0.5), math.log10(top), quarter, device=device) if quarter > 1 else \
            torch.full((1,), 0.5, device=device)
        freqs = 2.0 * math.pi * cycles.float()
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ay = gy.reshape(-1, 1) * freqs
    ax = gx.reshape(-1, 1) * freqs
    out[:, : 4 * quarter] = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return out


def to_grid(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``f`` on a grid of ``size``: average-pooled when finer, bilinear when coarser (pixel-aligned)."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    if f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


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
    """Global cross-attention from segmenter features (queries) to pooled DSDM features (keys/values)."""

    def __init__(self, channels: int, feature_channels: int, num_head_channels: int, groups: int,
                 kv_size: int, pos_encoding: str = "nyquist") -> None:
        super().__init__()
        self.kv_size = int(kv_size)
        self.pos_encoding = pos_encoding
        self.context_norm = nn.LayerNorm(feature_channels)
        self.caa = CrossAttentionAlignment(channels, feature_channels, num_head_channels, groups)

    def forward(self, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        if f.shape[-2] > self.kv_size or f.shape[-1] > self.kv_size:
            f = F.adaptive_avg_pool2d(f, (min(f.shape[-2], self.kv_size), min(f.shape[-1], self.kv_size)))
        fc, fh, fw = f.shape[1:]
        grid = min(hh, ww, fh, fw)  # both codes are read on the coarser grid
        tokens = f.to(h.dtype).flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = self.context_norm(tokens) + sincos_2d(fh, fw, fc, h.device, grid, self.pos_encoding).to(h.dtype)
        return self.caa(h, tokens, query_pos=sincos_2d(hh, ww, c, h.device, grid, self.pos_encoding))


class LocalCAAInjection(nn.Module):
    """Local CAA: each query pixel attends to the ``window x window`` DSDM positions around its own.

    ``h + W_O softmax_j(q_i . k_j / sqrt(d) + b_{head, j - i}) v_j`` with ``q = W_Q GN(h)``,
    ``k, v = W_K, W_V LN(f)`` (LayerNorm over channels at each position), ``f`` the DSDM features
    brought to ``h``'s grid (:func:`to_grid`), ``b`` a learned relative-position bias (zero: uniform
    over the window at the start) and ``W_O`` zero-initialised (a fresh block is the identity).
    Border windows repeat the edge features.
    """

    def __init__(self, channels: int, feature_channels: int, num_head_channels: int, groups: int,
                 window: int) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise UserInputError(f"seg.caa_window must be odd (1, 3, 5, ...) or 0 (global CAA), got {window}")
        if channels % num_head_channels:
            raise ValueError(f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels})")
        self.window = int(window)
        self.heads = channels // num_head_channels
        self.head_dim = num_head_channels
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)
        self.context_norm = nn.LayerNorm(feature_channels)  # per position: a pixel's keys depend on its window only
        self.to_q = nn.Conv2d(channels, channels, 1, bias=False)
        self.to_kv = nn.Conv2d(feature_channels, 2 * channels, 1, bias=False)
        self.rel_bias = nn.Parameter(torch.zeros(self.heads, self.window * self.window))
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = h.shape
        p, heads, d = self.window // 2, self.heads, self.head_dim
        f = to_grid(f.to(h.dtype), (hh, ww))
        q = self.to_q(self.norm(h)).reshape(n, heads, d, hh, ww) / math.sqrt(d)
        kv = self.to_kv(self.context_norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        if p:
            kv = F.pad(kv, (p, p, p, p), mode="replicate")
        k, v = kv.reshape(n, 2, heads, d, hh + 2 * p, ww + 2 * p).unbind(1)
        # one shifted slice per window offset (no unfolded copy: about twice as fast on the CPU)
        offsets = [(dy, dx) for dy in range(self.window) for dx in range(self.window)]
        logits = torch.stack([(q * k[..., dy:dy + hh, dx:dx + ww]).sum(2) for dy, dx in offsets], 2)
        attn = (logits + self.rel_bias[None, :, :, None, None]).softmax(2)  # (N, heads, w*w, H, W)
        out = attn[:, :, :1] * v[..., :hh, :ww]
        for j, (dy, dx) in enumerate(offsets[1:], start=1):
            out = out + attn[:, :, j:j + 1] * v[..., dy:dy + hh, dx:dx + ww]
        return h + self.out(out.reshape(n, c, hh, ww))


class Segmenter(nn.Module):
    """``(images, {block: DSDM features}) -> (N, num_classes, H, W)`` logits.

    ``feature_channels`` gives the channels of the injected features per decoder block
    (:meth:`~diffusiondci.segmentation.features.DiffusionFeatureExtractor.feature_channels`); it
    is empty for ``injection="none"``. ``caa_window`` (0: global, w: local) and ``kv_size`` /
    ``pos_encoding`` (global only) shape CAA (see the module docstring).
    """

    def __init__(
        self,
        unet_config: UNetConfig,
        injection: str = "caa",
        feature_channels: Mapping[int, int] | None = None,
        kv_size: int = 16,
        caa_window: int = 0,
        pos_encoding: str = "nyquist",
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
                if caa_window:
                    self.inject[str(b)] = LocalCAAInjection(ch, feature_channels[b], heads, groups, caa_window)
                else:
                    self.inject[str(b)] = CAAInjection(ch, feature_channels[b], heads, groups, kv_size, pos_encoding)

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
