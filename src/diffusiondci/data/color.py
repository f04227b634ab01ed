"""Modified Reinhard colour normalisation of tiled whole slides (paper §IV-B1, Fig. 2).

A whole-slide DCI image is a mosaic of acquisition ROI tiles and each tile may carry its own
colour cast. Reinhard's transfer [26] maps the colour statistics of a source image onto a target
in a decorrelated colour space; the paper's modification applies it *per acquisition tile*, with
the target being the average statistics of the whole slide (``norm_target="slide"``) or of the
whole dataset (``"dataset"``, for collections of small images such as GlaS). For tile ``t`` and
each CIELAB channel ``c`` independently::

    lab'_c = (lab_c - mu_t,c) / sd_t,c * sd_target,c + mu_target,c            (Reinhard transfer)

where ``mu_t, sd_t`` are the mean and standard deviation of the tile's *tissue* pixels only
(background would otherwise dominate both). We use CIELAB (D65, kornia's formulas, computed in
float32 numpy by :mod:`.lab`) in place of the original l-alpha-beta space: both are opponent
spaces and CIELAB is what the libraries provide.

Geometry: tile ``(ty, tx)`` covers rows ``ty*T .. (ty+1)*T`` and columns ``tx*T .. (tx+1)*T`` of the
slide (``T = tile_size``); edge tiles may be smaller.

Background handling (:func:`tissue_weight`): DCI background is black, H&E background near-white.
The transfer is blended per pixel with a *soft* tissue weight ``w`` in [0, 1] computed from the
pixel's own input colour, ``out = rgb + w * (reinhard(rgb) - rgb)``. Pixels that are clearly
background (``w = 0``) are returned bit-identical (black stays black, white stays white); pixels
near the thresholds get a partial transfer, so the output is a continuous function of the input
colour and no speckle appears inside tissue where dark/pale pixels straddle a hard threshold.
Because everything is pointwise, normalising a region gives exactly the same pixels as
normalising the whole slide and cropping (no neighbourhood operations across tile borders).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserInputError
from .lab import CHUNK_PX, lab_from_rgb8, rgb_from_lab, workspace
from .parallel import map_ordered
from .slides import Slide
from .tissue import (
    TissueConfig, _check_rgb, _lab_planes, _mask_from_lab, _to_uint8, _weight_from_lab, lab_to_rgb, rgb_to_lab,
    tissue_mask, tissue_weight,
)

__all__ = [
    "TissueConfig", "LabStats", "TileNormalizer",
    "rgb_to_lab", "lab_to_rgb", "tissue_weight", "tissue_mask",
    "tile_stats", "compute_slide_tile_stats", "slide_thumbnail", "average_stats",
    "normalize_image", "save_before_after",
]


@dataclass
class LabStats:
    """Mean and standard deviation (per L*, a*, b* channel) of ``n`` tissue pixels.

    ``n`` is the estimated number of tissue pixels at full resolution (the sampled count scaled
    by the subsampling area), so statistics from different subsampling factors weigh alike.
    """

    mean: np.ndarray
    std: np.ndarray
    n: int

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(3)
        self.std = np.asarray(self.std, dtype=np.float64).reshape(3)
        self.n = int(self.n)

    def to_dict(self) -> dict:
        """JSON-safe dict: ``{"mean": [3 floats], "std": [3 floats], "n": int}``."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | Path | None = None) -> LabStats:
        """Inverse of :meth:`to_dict`; malformed input raises :class:`UserInputError`."""
        try:
            mean = np.asarray(d["mean"], dtype=np.float64)
            std = np.asarray(d["std"], dtype=np.float64)
            n = int(d["n"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"malformed colour statistics ({exc!r}); regenerate with 'diffusiondci prepare'", path
            ) from None
        if mean.shape != (3,) or std.shape != (3,) or not (
            np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all() and n >= 0
        ):
            raise UserInputError(
                "malformed colour statistics (need 3 finite means, 3 stds >= 0, n >= 0); "
                "regenerate with 'diffusiondci prepare'", path
            )
        return cls(mean, std, n)



# --------------------------------------------------------------------------- statistics
def tile_stats(rgb: np.ndarray, cfg: TissueConfig | None = None, subsample: int = 1) -> LabStats | None:
    """LAB mean/std of the tissue pixels of one tile (every ``subsample``-th row and column).

    Returns ``None`` when fewer than ``cfg.min_pixels`` sampled pixels are tissue.
    """
    cfg = cfg or TissueConfig()
    rgb = _check_rgb(rgb, "tile")
    if subsample < 1:
        raise ValueError("subsample must be >= 1")
    sampled = rgb[::subsample, ::subsample]
    if sampled.size == 0:
        return None
    lab = _lab_planes(np.ascontiguousarray(sampled))
    mask = _mask_from_lab(lab, cfg)
    count = int(mask.sum())
    if count < cfg.min_pixels:
        return None
    px = lab[:, mask].astype(np.float64)
    mean = px.mean(axis=1)
    std = px.std(axis=1)
    area_ratio = (rgb.shape[0] * rgb.shape[1]) / (sampled.shape[0] * sampled.shape[1])
    return LabStats(mean, std, max(1, round(count * area_ratio)))


def _tile_grid(height: int, width: int, tile_size: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(ty, tx, x, y, w, h)`` for every acquisition tile of a ``height x width`` slide."""
    if tile_size < 1:
        raise ValueError("tile_size must be >= 1")
    out = []
    for ty in range(math.ceil(height / tile_size)):
        for tx in range(math.ceil(width / tile_size)):
            x, y = tx * tile_size, ty * tile_size
            out.append((ty, tx, x, y, min(tile_size, width - x), min(tile_size, height - y)))
    return out


def _block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-downsample by ``factor`` (partial edge blocks are padded with their edge pixels).

    Block sums are exact integers (rows first, contiguous), then divided and rounded in float32:
    the same numbers as a float32 mean, ~15x faster.
    """
    h, w = rgb.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = rgb.shape[0] // factor, rgb.shape[1] // factor
    rows = rgb.reshape(hh, factor, ww * factor * 3).sum(axis=1, dtype=np.uint16 if factor <= 257 else np.uint32)
    sums = rows.reshape(hh, ww, factor, 3).sum(axis=2, dtype=np.uint32)
    return np.rint(sums.astype(np.float32) / np.float32(factor * factor)).astype(np.uint8)


_tile_buffers = threading.local()


def _read(slide, x: int, y: int, w: int, h: int, reuse: bool = False) -> np.ndarray:
    """``slide.read_region``; with ``reuse`` a :class:`~.slides.Slide` reads into this thread's
    buffer (valid until the thread's next ``reuse`` read), saving a fresh allocation per tile."""
    if reuse and isinstance(slide, Slide):
        buf = getattr(_tile_buffers, "buf", None)
        if buf is None or buf.size < h * w * 3:
            buf = _tile_buffers.buf = np.empty(h * w * 3, np.uint8)
        return slide.read_region(x, y, w, h, out=buf[: h * w * 3].reshape(h, w, 3))
    region = np.asarray(slide.read_region(x, y, w, h))
    if region.shape != (h, w, 3) or region.dtype != np.uint8:
        raise ValueError(f"read_region({x}, {y}, {w}, {h}) returned {region.dtype} {region.shape}")
    return region


def compute_slide_tile_stats(
    slide,
    tile_size: int,
    cfg: TissueConfig | None = None,
    subsample: int = 4,
    progress: Callable[[int, int], None] | None = None,
    thumbnail_factor: int | None = None,
    workers: int | None = None,
):
    """Per-tile tissue LAB statistics of a slide, reading one tile at a time.

    ``slide`` needs ``height``, ``width`` and ``read_region(x, y, w, h) -> uint8 (h, w, 3)``, safe
    to call from several threads (as :class:`~diffusiondci.data.slides.Slide` is). Tiles are read
    and measured by ``workers`` threads (default: one per CPU, see :mod:`.parallel`), so memory is
    bounded by a few tiles. Tiles with too little tissue are absent from the result.
    ``progress(done, total)`` is called after each tile.

    Returns ``{(ty, tx): LabStats}``; with ``thumbnail_factor=f`` (``tile_size % f == 0``) returns
    ``(stats, thumbnail)`` where the thumbnail is the slide box-downsampled by ``f``, built from
    the same reads (for the before/after picture, normalise it with a
    ``TileNormalizer(stats, target, tile_size // f)``).
    """
    cfg = cfg or TissueConfig()
    if thumbnail_factor is not None and (thumbnail_factor < 1 or tile_size % thumbnail_factor):
        raise ValueError("thumbnail_factor must be >= 1 and divide tile_size")
    height, width = int(slide.height), int(slide.width)
    grid = _tile_grid(height, width, tile_size)
    thumb = None
    if thumbnail_factor is not None:
        f = thumbnail_factor
        thumb = np.zeros((-(-height // f), -(-width // f), 3), np.uint8)

    def measure(item):
        _, _, x, y, w, h = item
        tile = _read(slide, x, y, w, h, reuse=True)
        small = _block_mean(tile, thumbnail_factor) if thumb is not None else None
        return tile_stats(tile, cfg, subsample), small

    stats: dict[tuple[int, int], LabStats] = {}
    for i, ((ty, tx, x, y, _, _), (s, small)) in enumerate(zip(grid, map_ordered(measure, grid, workers))):
        if s is not None:
            stats[(ty, tx)] = s
        if small is not None:
            ys, xs = y // thumbnail_factor, x // thumbnail_factor
            thumb[ys : ys + small.shape[0], xs : xs + small.shape[1]] = small
        if progress is not None:
            progress(i + 1, len(grid))
    return stats if thumb is None else (stats, thumb)


def slide_thumbnail(slide, factor: int, tile_size: int = 2048) -> np.ndarray:
    """Box-downsampled thumbnail of a slide (reads ``tile_size``-sized blocks; memory bounded)."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    block = max(factor, tile_size - tile_size % factor)
    height, width = int(slide.height), int(slide.width)
    thumb = np.zeros((-(-height // factor), -(-width // factor), 3), np.uint8)
    for _, _, x, y, w, h in _tile_grid(height, width, block):
        small = _block_mean(_read(slide, x, y, w, h), factor)
        thumb[y // factor : y // factor + small.shape[0], x // factor : x // factor + small.shape[1]] = small
    return thumb


def average_stats(stats: Iterable[LabStats]) -> LabStats:
    """Normalisation target: tissue-pixel-weighted mean of the tile means and of the tile stds.

    The mean equals the pooled mean of all tissue pixels. The std is deliberately *not* the
    pooled std: the pooled variance is ``E[sd_t^2] + Var_t(mu_t)``, and the between-tile
    variance of the means ``Var_t(mu_t)`` is exactly the acquisition colour cast we remove;
    including it would inflate the target contrast of every tile. Averaging the within-tile
    stds gives the typical contrast of one tile.
    """
    items = [s for s in stats if s is not None]
    if not items:
        raise ValueError("average_stats needs at least one LabStats")
    n = np.array([s.n for s in items], np.float64)
    weights = n if n.sum() > 0 else np.ones_like(n)
    weights = weights / weights.sum()
    mean = np.sum([w * s.mean for w, s in zip(weights, items)], axis=0)
    std = np.sum([w * s.std for w, s in zip(weights, items)], axis=0)
    return LabStats(mean, std, int(n.sum()))


# --------------------------------------------------------------------------- the transfer
class TileNormalizer:
    """Per-tile Reinhard transfer of slide regions to a target (module docstring, eq. above).

    ``tile_stats`` maps ``(ty, tx)`` to that tile's :class:`LabStats`. Tiles without statistics
    (too little tissue) are left unchanged. For robustness the per-channel gain
    ``sd_target / sd_tile`` uses ``sd_tile >= min_std`` and is clipped to
    ``[1/max_scale, max_scale]``; L* is clipped to [0, 100] and out-of-gamut results to sRGB.
    Background pixels are kept via the soft tissue weight of ``tissue_cfg`` (module docstring).
    """

    def __init__(
        self,
        tile_stats: Mapping[tuple[int, int], LabStats],
        target: LabStats,
        tile_size: int,
        tissue_cfg: TissueConfig | None = None,
        min_std: float = 1.0,
        max_scale: float = 4.0,
    ):
        if tile_size < 1:
            raise ValueError("tile_size must be >= 1")
        if max_scale < 1 or min_std <= 0:
            raise ValueError("need max_scale >= 1 and min_std > 0")
        self.tile_stats = {(int(k[0]), int(k[1])): v for k, v in tile_stats.items()}
        self.target = target
        self.tile_size = int(tile_size)
        self.tissue_cfg = tissue_cfg or TissueConfig()
        self.min_std = float(min_std)
        self.max_scale = float(max_scale)
        self._affine = {k: self._gain_offset(s) for k, s in self.tile_stats.items()}

    def _gain_offset(self, s: LabStats) -> tuple[np.ndarray, np.ndarray]:
        """``lab' = gain * lab + offset`` with gain = sd_T/sd_t and offset = mu_T - gain * mu_t."""
        gain = self.target.std / np.maximum(s.std, self.min_std)
        gain = np.clip(gain, 1.0 / self.max_scale, self.max_scale)
        offset = self.target.mean - gain * s.mean
        return gain.astype(np.float32).reshape(3, 1), offset.astype(np.float32).reshape(3, 1)

    def _normalize_piece(self, piece: np.ndarray, key: tuple[int, int]) -> None:
        """Normalise ``piece`` (a uint8 h x w x 3 view of at most CHUNK_PX pixels) in place."""
        flat = piece.reshape(-1, 3)  # a copy when the view is not contiguous
        n = len(flat)
        ws = workspace(n)
        lab = lab_from_rgb8(flat, ws)
        cfg = self.tissue_cfg
        lo, hi = float(lab[0].min()), float(lab[0].max())
        if hi < cfg.dark_l - cfg.ramp / 2:
            return  # all clear background (w = 0): unchanged
        # all clearly tissue (w = 1: not dark, not bright): no weights, no blending
        w = None
        if not (lo > cfg.dark_l + cfg.ramp / 2 and hi < cfg.bright_l - cfg.ramp / 2):
            w = _weight_from_lab(lab, cfg, ws.weight[:n], ws.tmp[:n])
            if not w.any():
                return  # all background: unchanged
        gain, offset = self._affine[key]
        lab *= gain
        lab += offset
        np.clip(lab[0], np.float32(0.0), np.float32(100.0), out=lab[0])
        new = rgb_from_lab(lab, ws)  # 3 x N in [0, 1], in ws.rgb
        if w is not None:
            # blend with the soft tissue weight: out = old + w (new - old); w = 0 gives old exactly
            old = ws.tmp[:n]
            for c in range(3):
                np.divide(flat[:, c], np.float32(255.0), out=old)  # as uint8 / 255 in float32
                new[c] -= old
                new[c] *= w
                new[c] += old
        _to_uint8(new, flat)
        if not np.may_share_memory(flat, piece):  # flat was a copy
            piece[...] = flat.reshape(piece.shape)

    def apply(self, rgb_region: np.ndarray, x0: int = 0, y0: int = 0, inplace: bool = False,
              workers: int = 1) -> np.ndarray:
        """Normalise a region whose top-left pixel is slide pixel ``(x0, y0)``; returns uint8.

        The region may span several tiles; each part gets its own tile's transfer. The result
        equals normalising the whole slide and cropping the same region. With ``inplace`` the
        (writable) region itself is overwritten and returned, saving a copy. ``workers > 1``
        normalises the region's chunks on that many threads (same result).
        """
        rgb = _check_rgb(rgb_region, "region")
        if x0 < 0 or y0 < 0:
            raise ValueError("region origin must be >= 0")
        out = rgb if inplace else rgb.copy()
        h, w = rgb.shape[:2]
        T = self.tile_size
        if h == 0 or w == 0:
            return out
        pieces = []
        for ty in range(y0 // T, (y0 + h - 1) // T + 1):
            for tx in range(x0 // T, (x0 + w - 1) // T + 1):
                if (ty, tx) not in self._affine:
                    continue
                ys, ye = max(ty * T, y0) - y0, min((ty + 1) * T, y0 + h) - y0
                xs, xe = max(tx * T, x0) - x0, min((tx + 1) * T, x0 + w) - x0
                # pixel-wise transfer in chunks of <= CHUNK_PX pixels: the float temporaries stay
                # small (bounded memory on 3450 px ROIs, and in the CPU cache)
                rows = max(1, CHUNK_PX // (xe - xs))
                pieces += [(out[r : min(r + rows, ye), xs:xe], (ty, tx)) for r in range(ys, ye, rows)]
        for _ in map_ordered(lambda piece: self._normalize_piece(*piece), pieces, workers):
            pass
        return out

    def to_dict(self) -> dict:
        """JSON-safe description; :meth:`from_dict` rebuilds an identical normaliser."""
        return {
            "tile_size": self.tile_size,
            "target": self.target.to_dict(),
            "tiles": [[ty, tx, s.to_dict()] for (ty, tx), s in sorted(self.tile_stats.items())],
            "tissue": dataclasses.asdict(self.tissue_cfg),
            "min_std": self.min_std,
            "max_scale": self.max_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | Path | None = None) -> TileNormalizer:
        try:
            tiles = {(int(ty), int(tx)): LabStats.from_dict(s, path) for ty, tx, s in d["tiles"]}
            return cls(
                tiles, LabStats.from_dict(d["target"], path), int(d["tile_size"]),
                TissueConfig(**d.get("tissue", {})), float(d.get("min_std", 1.0)),
                float(d.get("max_scale", 4.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"malformed colour normaliser ({exc!r}); regenerate with 'diffusiondci prepare'", path
            ) from None


def normalize_image(
    rgb: np.ndarray,
    target: LabStats | None = None,
    cfg: TissueConfig | None = None,
    tile_size: int | None = None,
    subsample: int = 1,
) -> np.ndarray:
    """Normalise one in-memory image: statistics of its tiles (``tile_size=None``: the whole
    image is one tile) mapped to ``target`` (``None``: the image's own tile average, i.e. the
    ``slide`` target; pass a dataset average for ``dataset`` mode)."""
    rgb = _check_rgb(rgb)
    cfg = cfg or TissueConfig()
    h, w = rgb.shape[:2]
    size = tile_size or max(h, w, 1)
    stats = {}
    for ty, tx, x, y, tw, th in _tile_grid(h, w, size):
        s = tile_stats(rgb[y : y + th, x : x + tw], cfg, subsample)
        if s is not None:
            stats[(ty, tx)] = s
    if not stats:
        return rgb.copy()
    if target is None:
        target = average_stats(stats.values())
    return TileNormalizer(stats, target, size, cfg).apply(rgb, 0, 0)


# --------------------------------------------------------------------------- picture
def save_before_after(before_rgb: np.ndarray, after_rgb: np.ndarray, path: str | Path) -> Path:
    """Write a side-by-side PNG (``before`` | ``after``, labelled) to ``path`` atomically."""
    from PIL import Image, ImageDraw, ImageFont

    before, after = _check_rgb(before_rgb, "before"), _check_rgb(after_rgb, "after")
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ in size")
    h, w = before.shape[:2]
    gap = max(4, w // 100)
    band = max(18, min(64, w // 16))
    canvas = np.full((h + band, 2 * w + gap, 3), 255, np.uint8)
    canvas[band:, :w] = before
    canvas[band:, w + gap :] = after
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(band * 0.7))
    draw.text((4, band // 8), "before", fill=(0, 0, 0), font=font)
    draw.text((w + gap + 4, band // 8), "after (modified Reinhard)", fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG", compress_level=1)  # fast zlib (level 6 took several times longer)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
