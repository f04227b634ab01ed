"""The embedded sample: small, seeded, procedurally generated DCI-like whole slides.

Tests and ``diffusiondci demo`` need slides, masks, annotations and patient groups without any
download, so this module draws them (numpy + scipy.ndimage + scikit-image only, no learning).

What is imitated (paper §IV-B1 and §V-A "Dataset"):

* **Colour model.** DCI (dynamic full-field OCT) gives every pixel a colour from its dynamic
  signal, rendered in HSV: *hue* = characteristic frequency of the signal (slow or static
  structures such as stroma and fibres are blue/cyan/green, metabolically active cells are
  yellow/orange/red), *value* = amplitude of the fluctuation, *saturation* = how narrow the
  spectrum is. The phantom builds the three fields and converts them with
  :func:`skimage.color.hsv2rgb`; anything without tissue is black.
* **Tissue.** One irregular tissue piece on a black background, with fat vacuoles (black holes
  with thin membranes) and wavy fibrous stroma (sparse, dim, blue).
* **Benign** regions: lobule/duct-like clusters of round acini whose epithelium forms bright rings
  of cells around dark lumens, in cool colours (green/cyan, a few yellow cells).
* **Malignant** regions: dense, disordered, pleomorphic cells arranged in nests, bright and warm
  (red/orange/yellow).
* **Acquisition tiles.** A DCI slide is a mosaic of separately acquired ROI patches, which shows
  as colour discrepancies and seams between tiles (§IV-B1, the reason for the modified Reinhard
  normalisation). :attr:`PhantomSlide.rgb` has a random per-tile, per-channel gain and offset plus
  a mild per-tile vignette; :attr:`PhantomSlide.clean_rgb` is the same slide without them.

Label convention (``diffusiondci.CLASS_NAMES``): the mask is what a pathologist would annotate in
QuPath. **0 background** is everything outside an annotated lesion, *tissue or not* (the black
background, fat and normal stroma); **1 benign** and **2 malignant** are the annotated regions
(lumens and the loose stroma between acini included, like a hand-drawn outline). Labels always lie
inside the tissue outline. :attr:`PhantomSlide.tissue` says separately where tissue is.

Sample layout written by :func:`write_sample`::

    out_dir/README.txt
    out_dir/slides/<stem>.tif|.png      slides with casts (every third one, the first included,
                                        is a tiled TIFF with 256 px tiles; the others are PNG)
    out_dir/slides/<stem>_mask.png      label image for most slides ...
    out_dir/slides/<stem>.geojson       ... a QuPath-style GeoJSON instead for ``geojson_slides``
    out_dir/slides/groups.csv           slide,group (patient ids; several slides may share one)
    out_dir/clean/<stem>.png            the cast-free slide (for evaluating colour normalisation)
    out_dir/truth/<stem>_mask.png       the ground-truth mask of every slide, GeoJSON ones included

GeoJSON coordinates follow QuPath: x to the right, y down, in pixels, pixel (row r, column c)
covering ``x in [c, c + 1)``, ``y in [r, r + 1)``; so a pixel belongs to a polygon when its
centre ``(c + 0.5, r + 0.5)`` does. The polygons are traced from the mask (marching squares,
:func:`skimage.measure.find_contours`) and describe the same regions to well within 1 % of area.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import UserInputError

__all__ = ["PhantomSlide", "SampleInfo", "TileCasts", "generate_slide", "mask_to_geojson", "write_sample"]

#: Tile size of the TIFF slides (the pyramid-free, tiled layout that real DCI exports use).
TIFF_TILE = 256

_MIN_SIDE = 64
# Pixel-scale constants: the phantom has a fixed "magnification" whatever the slide size.
_CELL_SIGMA = 1.2            # radius-ish of a benign / stromal cell (px)
_TUMOUR_SIGMAS = (1.4, 2.3)  # two cell sizes in malignant regions (pleomorphism)
_TUMOUR_DENSITY = 1 / 16     # malignant cells per px^2 (before nest modulation)


@dataclass
class TileCasts:
    """Per-acquisition-tile colour casts: ``rgb = clean * gain * vignette + offset`` on tissue.

    ``gain`` and ``offset`` are ``rows x cols x 3`` (offset in 0-255 grey levels), ``vignette`` is the
    relative brightness loss at a tile corner (``rows x cols``); tile ``(i, j)`` covers rows
    ``[i * tile_size, (i + 1) * tile_size)`` and the same for columns.
    """

    tile_size: int
    gain: np.ndarray
    offset: np.ndarray
    vignette: np.ndarray


@dataclass
class PhantomSlide:
    """One generated slide; see the module docstring for what each class looks like."""

    rgb: np.ndarray        # uint8 H x W x 3, with per-tile colour casts
    clean_rgb: np.ndarray  # uint8 H x W x 3, the same without casts
    mask: np.ndarray       # uint8 H x W, 0 background (incl. normal tissue), 1 benign, 2 malignant
    tissue: np.ndarray     # bool H x W, tissue (lesions included, fat and background excluded)
    casts: TileCasts


@dataclass
class SampleInfo:
    """What :func:`write_sample` wrote; every dict is keyed by slide stem."""

    root: Path
    slides_dir: Path
    stems: list[str]
    slides: dict[str, Path]
    masks: dict[str, Path]     # label images beside the slides (slides without GeoJSON)
    geojson: dict[str, Path]   # GeoJSON annotations (instead of a label image)
    groups_csv: Path
    groups: dict[str, str]
    clean: dict[str, Path]
    truth: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# random fields


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale`` px wide (drawn coarse, upsampled)."""
    h, w = shape
    scale = max(float(scale), 1.0)
    small_shape = (int(math.ceil(h / scale)) + 3, int(math.ceil(w / scale)) + 3)
    small = ndi.gaussian_filter(rng.standard_normal(small_shape, dtype=np.float32), 1.0, mode="wrap")
    # cubic spline up to a quarter of the final factor, then bilinear (smooth enough, 3x faster)
    fine = 4.0 if scale >= 8 else 1.0
    big = ndi.zoom(small, scale / fine, order=3)
    if fine > 1:
        big = ndi.zoom(big, fine, order=1)
    off = int(scale)
    big = big[off : off + h, off : off + w]
    if big.shape != (h, w):  # rounding in zoom (at most a pixel)
        big = np.pad(big, ((0, h - big.shape[0]), (0, w - big.shape[1])), mode="edge")
    return ((big - big.mean()) / (big.std() + 1e-8)).astype(np.float32)


def _disk(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a disk of ``radius`` (Euclidean distance transform: O(N) whatever the radius)."""
    return ndi.distance_transform_edt(~mask) <= radius


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erosion by a disk of ``radius`` (pixels farther than ``radius`` from the outside)."""
    return ndi.distance_transform_edt(np.pad(mask, 1, constant_values=False))[1:-1, 1:-1] > radius


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


# --------------------------------------------------------------------------------------------------
# layout: tissue outline, malignant region, benign lobules, fat


def _tissue_outline(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """An irregular piece of tissue (ellipse perturbed by two scales of smooth noise), holes filled."""
    h, w = shape
    side = min(h, w)
    cy, cx = h / 2 + rng.uniform(-0.05, 0.05) * h, w / 2 + rng.uniform(-0.05, 0.05) * w
    ry, rx = rng.uniform(0.36, 0.46) * h, rng.uniform(0.36, 0.46) * w
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / rx
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / ry
    field_ = 1.0 - np.sqrt(u * u + v * v)
    field_ += 0.16 * _smooth_noise(rng, shape, side / 5) + 0.05 * _smooth_noise(rng, shape, side / 24)
    outline = _largest_component(field_ > 0)
    return ndi.binary_fill_holes(outline)


def _malignant_region(rng: np.random.Generator, outline: np.ndarray, fraction: float) -> np.ndarray:
    """Irregular invasive blobs covering ``fraction`` of the tissue (a thresholded smooth field)."""
    h, w = outline.shape
    side = min(h, w)
    ys, xs = np.nonzero(outline)
    k = rng.integers(len(ys))
    fy, fx = ys[k], xs[k]  # a focus the tumour grows around
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.sqrt((yy - fy) ** 2 + (xx - fx) ** 2) / side
    field_ = _smooth_noise(rng, outline.shape, side / 6) + 0.4 * _smooth_noise(rng, outline.shape, side / 16)
    field_ -= 3.0 * dist
    inner = _erode(outline, 4)
    thr = np.quantile(field_[inner], 1.0 - fraction * outline.sum() / max(inner.sum(), 1))
    region = (field_ > thr) & inner
    region = ndi.binary_opening(region, _disk(3))
    region = _remove_small(region, 600)
    region = ~_remove_small(~region, 400)  # fill small holes, as an annotator's outline would
    return region & outline


def _lobules(
    rng: np.random.Generator,
    available: np.ndarray,
    target_px: int,
    radius_range: tuple[float, float] = (34, 62),
    max_lobules: int = 1000,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Place lobules (clusters of acini) and ducts in ``available`` until ``target_px`` are covered.

    Returns the benign region (union of lobule envelopes) and the acini as ``(y, x, radius)``.
    """
    h, w = available.shape
    wobble = _smooth_noise(rng, (h, w), 10)
    benign = np.zeros((h, w), bool)
    acini: list[tuple[float, float, float]] = []
    free = available.copy()
    placed = 0
    for _ in range(80):
        if benign.sum() >= target_px or placed >= max_lobules:
            break
        ys, xs = np.nonzero(free)
        if len(ys) == 0:
            break
        k = rng.integers(len(ys))
        cy, cx = float(ys[k]), float(xs[k])
        radius = rng.uniform(*radius_range)
        duct = rng.random() < 0.25 and radius >= 30
        y0, y1 = max(int(cy - radius - 8), 0), min(int(cy + radius + 9), h)
        x0, x1 = max(int(cx - radius - 8), 0), min(int(cx + radius + 9), w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        env = (d / radius + 0.12 * wobble[y0:y1, x0:x1]) < 1.0
        inside = env & available[y0:y1, x0:x1]
        if inside.sum() < 0.8 * env.sum():
            free[int(cy), int(cx)] = False
            continue
        new: list[tuple[float, float, float]] = []
        if duct:  # one large duct, a few acini around it
            new.append((cy, cx, rng.uniform(14, min(24, radius - 12))))
        for _try in range(60):
            r = rng.uniform(5.0, 10.0)
            rho = radius * 0.82 - r - 3
            if rho <= 0:
                break
            a, q = rng.uniform(0, 2 * math.pi), rho * math.sqrt(rng.random())
            y, x = cy + q * math.sin(a), cx + q * math.cos(a)
            yi, xi = int(round(y)), int(round(x))
            if not (0 <= yi < h and 0 <= xi < w and available[yi, xi]):
                continue
            if all((y - oy) ** 2 + (x - ox) ** 2 > (r + orr + 3) ** 2 for oy, ox, orr in new):
                new.append((y, x, r))
        if len(new) < 3 and not duct:
            free[int(cy), int(cx)] = False
            continue
        benign[y0:y1, x0:x1] |= inside
        acini.extend(new)
        placed += 1
        fy0, fy1, fx0, fx1 = max(y0 - 6, 0), min(y1 + 6, h), max(x0 - 6, 0), min(x1 + 6, w)
        free[fy0:fy1, fx0:fx1] &= ~_dilate(benign[fy0:fy1, fx0:fx1], 6)
    benign = ~_remove_small(~benign, 300) & available
    return benign, acini


def _fat_vacuoles(rng: np.random.Generator, stroma: np.ndarray) -> np.ndarray:
    """Clusters of round black fat cells in normal stroma."""
    h, w = stroma.shape
    fat = np.zeros((h, w), bool)
    safe = _erode(stroma, 22)
    ys, xs = np.nonzero(safe)
    if len(ys) == 0:
        return fat
    n_clusters = int(rng.integers(1, 4)) * max(1, (h * w) // (768 * 768))
    for _ in range(n_clusters):
        k = rng.integers(len(ys))
        cy, cx = ys[k], xs[k]
        for _cell in range(int(rng.integers(3, 9))):
            y = int(cy + rng.normal(0, 18))
            x = int(cx + rng.normal(0, 18))
            r = rng.uniform(7, 15)
            rr = int(math.ceil(r))
            if not (rr <= y < h - rr and rr <= x < w - rr):
                continue
            fat[y - rr : y + rr + 1, x - rr : x + rr + 1] |= _disk(r)
    fat &= safe
    return fat


# --------------------------------------------------------------------------------------------------
# rendering


class _Canvas:
    """Accumulates value, hue and saturation as value-weighted sums (hue = sum(v h) / sum(v))."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.v = np.zeros(shape, np.float32)
        self.vh = np.zeros(shape, np.float32)
        self.vs = np.zeros(shape, np.float32)
        self._splats: dict[float, list[tuple[np.ndarray, ...]]] = {}

    def add_field(self, value: np.ndarray, hue, sat) -> None:
        self.v += value
        self.vh += value * hue
        self.vs += value * sat

    def add_cells(self, rows, cols, amp, hue, sat, sigma: float) -> None:
        """Gaussian cells of peak ``amp`` at (rounded) positions; rendered together in :meth:`hsv`."""
        h, w = self.shape
        rows = np.clip(np.asarray(rows).round().astype(np.int64), 0, h - 1)
        cols = np.clip(np.asarray(cols).round().astype(np.int64), 0, w - 1)
        flat = rows * w + cols
        amp = np.broadcast_to(np.asarray(amp, np.float64), flat.shape)
        hue = np.broadcast_to(np.asarray(hue, np.float64), flat.shape)
        sat = np.broadcast_to(np.asarray(sat, np.float64), flat.shape)
        self._splats.setdefault(sigma, []).append((flat, amp, amp * hue, amp * sat))

    def hsv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render the cells, then return value and the value-weighted mean hue and saturation."""
        n = self.shape[0] * self.shape[1]
        for sigma, parts in self._splats.items():
            flat = np.concatenate([p[0] for p in parts])
            gain = 2 * math.pi * sigma * sigma  # a filtered impulse of weight a peaks at a
            for k, target in ((1, self.v), (2, self.vh), (3, self.vs)):
                acc = np.bincount(flat, weights=np.concatenate([p[k] for p in parts]), minlength=n)
                acc = ndi.gaussian_filter(acc.reshape(self.shape).astype(np.float32), sigma, truncate=3.0)
                target += acc * gain
        self._splats.clear()
        eps = 1e-6
        return self.v, self.vh / (self.v + eps), self.vs / (self.v + eps)


def _poisson_points(rng: np.random.Generator, density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of an inhomogeneous Poisson process with ``density`` (per px), jittered sub-pixel."""
    ys, xs = np.nonzero(rng.random(density.shape) < np.clip(density, 0, 1))
    return ys + rng.uniform(-0.5, 0.5, len(ys)), xs + rng.uniform(-0.5, 0.5, len(xs))


def _render(
    rng: np.random.Generator,
    tissue: np.ndarray,
    fat: np.ndarray,
    malignant: np.ndarray,
    benign: np.ndarray,
    acini: list[tuple[float, float, float]],
) -> np.ndarray:
    h, w = tissue.shape
    canvas = _Canvas((h, w))
    shift = rng.normal(0, 0.02)  # slide-level hue drift (tissue freshness, acquisition time)
    soft_tissue = ndi.gaussian_filter(tissue.astype(np.float32), 1.0)
    soft_malig = ndi.gaussian_filter(malignant.astype(np.float32), 4.0)
    soft_benign = ndi.gaussian_filter(benign.astype(np.float32), 3.0)

    # fibrous stroma: two oriented, blended fibre textures, sparse and dim, cool colours
    f1 = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), (0.8, 5.0))
    f2 = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), (5.0, 0.8))
    blend = 1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, (h, w), 60)))
    fib = np.abs(blend * f1 / f1.std() + (1 - blend) * f2 / f2.std())
    fib = np.clip(fib / 2.2, 0, 1) ** 2
    density = 0.55 + 0.45 * np.clip(_smooth_noise(rng, (h, w), 40), -1, 1)
    stroma_v = 0.8 * fib * density * soft_tissue * (1 - 0.75 * soft_malig) * (1 - 0.5 * soft_benign)
    stroma_h = np.clip(0.57 + shift + 0.05 * _smooth_noise(rng, (h, w), 30), 0.45, 0.68)
    canvas.add_field(stroma_v, stroma_h, 0.75)

    # sparse stromal cells (fibroblasts, immune cells): green-cyan dots
    ys, xs = _poisson_points(rng, tissue * (1 / 500))
    n = len(ys)
    hues = 0.42 + shift + rng.normal(0, 0.05, n)
    canvas.add_cells(ys, xs, rng.uniform(0.3, 0.7, n), hues, 0.7, _CELL_SIGMA)

    # fat: membranes around the vacuoles
    membrane = ndi.binary_dilation(fat, _disk(1.5)) & ~fat
    canvas.add_field(0.35 * membrane.astype(np.float32), 0.55 + shift, 0.6)

    # benign: loose greenish intralobular stroma + acini with rings of epithelial cells around lumens
    loose = 0.10 * soft_benign * (0.6 + 0.4 * rng.random((h, w), dtype=np.float32))
    canvas.add_field(loose, 0.46 + shift, 0.6)
    b_hue = 0.36 + shift + rng.normal(0, 0.02)
    for cy, cx, r in acini:
        layers = ((r, 2.8, (0.55, 1.0), b_hue, "epi"), (r + 2.6, 5.0, (0.3, 0.5), 0.52, "myo"))
        for radius, spacing, amp, hue, layer in layers:
            k = max(6, int(round(2 * math.pi * radius / spacing)))
            theta = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 2 * math.pi)
            theta += rng.normal(0, 0.25 * spacing / radius, k)
            rad = radius + rng.normal(0, 0.5, k)
            hues = hue + rng.normal(0, 0.04, k)
            if layer == "epi":
                hues = np.where(rng.random(k) < 0.12, 0.15 + shift, hues)  # a few active cells
            canvas.add_cells(cy + rad * np.sin(theta), cx + rad * np.cos(theta), rng.uniform(*amp, k),
                             hues, 0.75, _CELL_SIGMA)

    # malignant: dense, disordered, pleomorphic warm cells grouped in nests, over a warm haze
    nests = np.clip(0.55 + 0.6 * _smooth_noise(rng, (h, w), 9), 0.1, 1.0)
    m_hue = rng.uniform(0.03, 0.10) + shift
    hue_var = 0.03 * _smooth_noise(rng, (h, w), 50)
    canvas.add_field(0.16 * soft_malig * tissue, np.clip(m_hue + 0.04 + hue_var, 0, 0.2), 0.8)
    for sigma, share in zip(_TUMOUR_SIGMAS, (0.7, 0.3)):
        dens = soft_malig * nests * tissue * (_TUMOUR_DENSITY * share * (1.4 / sigma) ** 2)
        ys, xs = _poisson_points(rng, dens)
        n = len(ys)
        local = hue_var[ys.round().astype(int).clip(0, h - 1), xs.round().astype(int).clip(0, w - 1)]
        hues = np.clip(m_hue + local + rng.normal(0, 0.03, n), 0.0, 0.2)
        canvas.add_cells(ys, xs, rng.uniform(0.45, 1.25, n), hues, rng.uniform(0.75, 0.95, n), sigma)

    v, hue, sat = canvas.hsv()
    v = 1.0 - np.exp(-1.7 * v)  # saturating detector response
    grain = 1.0 + 0.22 * ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 0.6) / 0.33
    v = np.clip(v * grain, 0, 1) * soft_tissue
    # background: black, a trace of camera noise
    v += (1 - soft_tissue) * np.clip(0.012 + 0.006 * rng.standard_normal((h, w)), 0, 0.05)
    hue = np.where(soft_tissue > 0.01, hue, 0.6)
    from skimage.color import hsv2rgb

    rgb = hsv2rgb(np.stack([np.clip(hue, 0, 1), np.clip(sat, 0, 1), np.clip(v, 0, 1)], axis=-1))
    return np.round(rgb * 255).astype(np.uint8)


def _apply_casts(
    rng: np.random.Generator, clean: np.ndarray, tissue: np.ndarray, tile_size: int, strength: float
) -> tuple[np.ndarray, TileCasts]:
    """Per-tile, per-channel gain and offset plus a vignette (mosaic seams, paper §IV-B1)."""
    h, w = tissue.shape
    rows, cols = -(-h // tile_size), -(-w // tile_size)
    gain = np.exp(strength * (rng.normal(0, 0.16, (rows, cols, 3)) + rng.normal(0, 0.1, (rows, cols, 1))))
    offset = strength * rng.normal(0, 9.0, (rows, cols, 3))
    vignette = strength * rng.uniform(0.04, 0.15, (rows, cols))
    casts = TileCasts(tile_size=tile_size, gain=gain, offset=offset, vignette=vignette)
    if strength == 0:
        return clean.copy(), casts
    soft = ndi.gaussian_filter(tissue.astype(np.float32), 1.5)[..., None]
    out = clean.astype(np.float32)
    for i in range(rows):
        for j in range(cols):
            ys, xs = slice(i * tile_size, (i + 1) * tile_size), slice(j * tile_size, (j + 1) * tile_size)
            th, tw = out[ys, xs].shape[:2]
            u = np.linspace(-1, 1, tile_size)[:th, None]
            q = np.linspace(-1, 1, tile_size)[None, :tw]
            vig = (1.0 - vignette[i, j] * (u * u + q * q) / 2)[..., None]
            out[ys, xs] = out[ys, xs] * gain[i, j] * vig + offset[i, j] * soft[ys, xs]
    return np.clip(np.round(out), 0, 255).astype(np.uint8), casts


def generate_slide(
    size: tuple[int, int] = (768, 768),
    tile_size: int = 256,
    seed: int | Sequence[int] = 0,
    cast_strength: float = 1.0,
) -> PhantomSlide:
    """Generate one DCI-like slide with its ground truth (deterministic for ``seed``).

    ``size`` is ``(H, W)`` (at least 64 px a side); ``tile_size`` the acquisition tile whose colour
    cast is drawn independently; ``cast_strength`` scales the casts (0: ``rgb == clean_rgb``).
    ``seed`` is anything :func:`numpy.random.default_rng` accepts (an int or a sequence of ints).
    Both classes are always present: malignant covers 12-35 % and benign 12-25 % of the tissue.
    """
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise UserInputError(f"phantom size must be (height, width), got {size!r}") from None
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise UserInputError(f"phantom size must be at least {_MIN_SIDE} px a side, got {h}x{w}")
    if int(tile_size) < 16:
        raise UserInputError(f"phantom tile_size must be at least 16 px, got {tile_size}")
    if not cast_strength >= 0:
        raise UserInputError(f"phantom cast_strength must be >= 0, got {cast_strength}")
    rng = np.random.default_rng(seed)
    shape = (h, w)
    outline = _tissue_outline(rng, shape)
    malignant = _malignant_region(rng, outline, rng.uniform(0.12, 0.35))
    available = _erode(outline, 3) & ~_dilate(malignant, 14)
    benign, acini = _lobules(rng, available, int(rng.uniform(0.12, 0.25) * outline.sum()))
    if rng.random() < 0.6:  # a benign lobule entrapped in the tumour: a hole in the malignant region
        trapped, trapped_acini = _lobules(rng, _erode(malignant, 10), 1, (24, 36), max_lobules=1)
        malignant &= ~trapped
        benign |= trapped
        acini += trapped_acini
    stroma = outline & ~_dilate(malignant | benign, 10)
    fat = _fat_vacuoles(rng, stroma)
    tissue = outline & ~fat
    mask = np.zeros(shape, np.uint8)
    mask[benign] = 1
    mask[malignant] = 2
    clean = _render(rng, tissue, fat, malignant, benign, acini)
    rgb, casts = _apply_casts(rng, clean, tissue, int(tile_size), float(cast_strength))
    return PhantomSlide(rgb=rgb, clean_rgb=clean, mask=mask, tissue=tissue, casts=casts)


# --------------------------------------------------------------------------------------------------
# annotations


def mask_to_geojson(mask: np.ndarray) -> dict:
    """QuPath-style GeoJSON of ``mask`` (see :func:`diffusiondci.data.annotations.mask_to_geojson`)."""
    from .annotations import mask_to_geojson as export

    return export(mask)


# --------------------------------------------------------------------------------------------------
# the sample on disk

_README = """\
DiffusionDCI embedded sample (generated by diffusiondci.data.phantom, seed {seed})
================================================================================

Synthetic, procedurally generated stand-ins for Dynamic Cell Imaging (dynamic full-field OCT)
whole slides: black background, tissue coloured by cell dynamics (blue/green = slow or static
stroma and fibres, yellow/orange/red = metabolically active cells). They are NOT real data and
carry no diagnostic meaning; they exist so the tests and `diffusiondci demo` run offline.

slides/<stem>.tif|png    {n} slides of {h}x{w} px with per-acquisition-tile colour casts
                         ({tile} px tiles) like the seams of a real DCI mosaic
slides/<stem>_mask.png   label images: 0 background (incl. normal tissue), 1 benign, 2 malignant
slides/<stem>.geojson    QuPath-style annotations (classes "Benign", "Malignant") for: {geo}
slides/groups.csv        slide,group - patient ids for patient-level splits
clean/<stem>.png         the same slides without colour casts (to evaluate colour normalisation)
truth/<stem>_mask.png    ground-truth label image of every slide
"""


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_sample(
    out_dir: str | os.PathLike,
    n_slides: int = 3,
    size: tuple[int, int] = (768, 768),
    tile_size: int = 256,
    seed: int = 0,
    geojson_slides: Sequence[int] = (-1,),
) -> SampleInfo:
    """Write the embedded sample to ``out_dir`` (layout in the module docstring) and describe it.

    Slide ``i`` is ``generate_slide(size, tile_size, seed=(seed, i))``; slide ``i`` is a tiled TIFF
    when ``i % 3 == 0`` and a PNG otherwise. ``geojson_slides`` are slide indices (negative ones
    count from the end) annotated with a GeoJSON instead of a label image. Patients: each slide is
    its own patient for up to three slides, beyond that slides are dealt to ``max(3, n // 2)``
    patients, so patient-level splits always have at least two groups when ``n_slides >= 2``.
    Everything is written to ``<out_dir>.partial`` first and moved into place at the end.
    """
    import tifffile

    out_dir = Path(out_dir)
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise UserInputError(f"n_slides must be a positive integer, got {n_slides!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError("is a file, not a folder; choose another output folder", out_dir)
    geo_idx = set()
    for k in geojson_slides:
        if not -n_slides <= int(k) < n_slides:
            raise UserInputError(f"geojson_slides index {k} is out of range for {n_slides} slides")
        geo_idx.add(int(k) % n_slides)
    n_groups = n_slides if n_slides <= 3 else max(3, n_slides // 2)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    slides_dir, clean_dir, truth_dir = staging / "slides", staging / "clean", staging / "truth"
    for d in (slides_dir, clean_dir, truth_dir):
        d.mkdir(parents=True)

    stems = [f"phantom_{i:03d}" for i in range(n_slides)]
    names: dict[str, str] = {}
    groups: dict[str, str] = {}
    for i, stem in enumerate(stems):
        slide = generate_slide(size, tile_size, seed=(int(seed), i))
        if i % 3 == 0:
            names[stem] = f"{stem}.tif"
            tifffile.imwrite(slides_dir / names[stem], slide.rgb, photometric="rgb",
                             tile=(TIFF_TILE, TIFF_TILE), compression="zlib", metadata=None)
        else:
            names[stem] = f"{stem}.png"
            _write_png(slides_dir / names[stem], slide.rgb)
        if i in geo_idx:
            text = json.dumps(mask_to_geojson(slide.mask), separators=(",", ":"))
            (slides_dir / f"{stem}.geojson").write_text(text)
        else:
            _write_png(slides_dir / f"{stem}_mask.png", slide.mask)
        _write_png(clean_dir / f"{stem}.png", slide.clean_rgb)
        _write_png(truth_dir / f"{stem}_mask.png", slide.mask)
        groups[stem] = f"P{i % n_groups:03d}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide", "group"])
    writer.writerows(groups.items())
    (slides_dir / "groups.csv").write_text(buf.getvalue())
    geo_names = ", ".join(stems[i] for i in sorted(geo_idx)) or "none"
    (staging / "README.txt").write_text(_README.format(seed=seed, n=n_slides, h=size[0], w=size[1],
                                                       tile=tile_size, geo=geo_names))

    # move into place; slides/ last, so its presence means the sample is complete
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("README.txt", "clean", "truth", "slides"):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)

    slides_out = out_dir / "slides"
    return SampleInfo(
        root=out_dir,
        slides_dir=slides_out,
        stems=stems,
        slides={s: slides_out / names[s] for s in stems},
        masks={s: slides_out / f"{s}_mask.png" for i, s in enumerate(stems) if i not in geo_idx},
        geojson={s: slides_out / f"{s}.geojson" for i, s in enumerate(stems) if i in geo_idx},
        groups_csv=slides_out / "groups.csv",
        groups=groups,
        clean={s: out_dir / "clean" / f"{s}.png" for s in stems},
        truth={s: out_dir / "truth" / f"{s}_mask.png" for s in stems},
    )
