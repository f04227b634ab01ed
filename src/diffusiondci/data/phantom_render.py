"""The phantom's colours: a layout rendered as a DCI image, then per-tile acquisition casts.

:func:`_render` turns the masks of :mod:`diffusiondci.data.phantom_layout` into the HSV fields of
dynamic full-field OCT (hue = dynamics, value = amplitude; see the colour model in
:mod:`diffusiondci.data.phantom`) and converts them to RGB; :func:`_apply_casts` adds the
per-acquisition-tile gain, offset and vignette that normalisation has to remove (:class:`TileCasts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .phantom_layout import _disk, _smooth_noise

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
