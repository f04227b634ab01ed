"""The phantom's layout: where tissue, malignant region, benign lobules and fat lie.

Boolean masks only, no colour (that is :mod:`diffusiondci.data.phantom_render`). Everything is
drawn from smooth random fields and disks with numpy + scipy.ndimage; the random draws happen in
a fixed order, so a seed gives the same layout every time. Used by
:func:`diffusiondci.data.phantom.generate_slide`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


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
