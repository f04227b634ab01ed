"""Tissue detection in CIELAB and the image-level colour conversions of :mod:`.color`.

:class:`TissueConfig` holds the thresholds; :func:`tissue_mask` is the hard tissue mask (used for
statistics and tissue fractions) and :func:`tissue_weight` the soft weight that blends the colour
transfer into the background. :func:`rgb_to_lab` / :func:`lab_to_rgb` convert whole images with
the float32 maths of :mod:`.lab`. Everything here is re-exported by :mod:`.color`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lab import CHUNK_PX, lab_from_rgb8, lab_from_rgb_float, rgb_from_lab, workspace

__all__ = ["TissueConfig", "lab_to_rgb", "rgb_to_lab", "tissue_mask", "tissue_weight"]


@dataclass
class TissueConfig:
    """Tissue detector thresholds in CIELAB (L* in 0..100, chroma C* = hypot(a*, b*)).

    A pixel is background if it is dark (``L* <= dark_l``: DCI's black background) or bright and
    grey (``L* >= bright_l`` and ``C* <= bright_chroma``: H&E's white glass). The defaults work for
    both: black noise up to about RGB 25 and white glass down to about RGB 215 (chroma up to
    ~9 after the soft ramp) are background; coloured or mid-grey pixels are tissue. ``ramp`` is the width (in L*/C* units) of the soft
    transition used when blending the transfer (0 = hard). ``min_pixels`` is the minimum number
    of sampled tissue pixels for a tile to get statistics.
    """

    dark_l: float = 10.0
    bright_l: float = 85.0
    bright_chroma: float = 12.0
    ramp: float = 6.0
    min_pixels: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.dark_l < self.bright_l <= 100:
            raise ValueError("TissueConfig needs 0 <= dark_l < bright_l <= 100")
        if self.ramp < 0 or self.bright_chroma < 0 or self.min_pixels < 1:
            raise ValueError("TissueConfig: ramp and bright_chroma must be >= 0, min_pixels >= 1")




# --------------------------------------------------------------------------- colour conversion
def _check_rgb(rgb: np.ndarray, name: str = "image") -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
    return rgb


def _lab_planes(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW CIELAB, converted in chunks."""
    h, w = rgb.shape[:2]
    flat = rgb.reshape(-1, 3)
    lab = np.empty((3, h * w), np.float32)
    ws = workspace(CHUNK_PX)
    for i in range(0, h * w, CHUNK_PX):
        lab[:, i : i + CHUNK_PX] = lab_from_rgb8(flat[i : i + CHUNK_PX], ws)
    return lab.reshape(3, h, w)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, or float in [0, 1]) HxWx3 -> CIELAB float32 HxWx3 (D65; kornia's formulas)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return np.moveaxis(_lab_planes(_check_rgb(rgb)), 0, -1).copy()
    lab = lab_from_rgb_float(rgb.reshape(-1, 3))
    return lab.T.reshape(rgb.shape).copy()


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB HxWx3 -> sRGB uint8 HxWx3 (out-of-gamut colours clipped)."""
    lab = np.asarray(lab, np.float32)
    planes = np.ascontiguousarray(lab.reshape(-1, 3).T)
    rgb = rgb_from_lab(planes)
    out = np.empty((planes.shape[1], 3), np.uint8)
    _to_uint8(rgb, out)
    return out.reshape(lab.shape)


def _to_uint8(rgb01: np.ndarray, out: np.ndarray) -> None:
    """``3 x N`` float in [0, 1] -> ``out`` (``N x 3`` uint8): x 255, rounded half to even.
    ``rgb01`` is overwritten. (Values past [0, 1] by float rounding still round into 0..255.)"""
    rgb01 *= np.float32(255.0)
    np.rint(rgb01, out=rgb01)
    for c in range(3):  # channel by channel: ~3x faster than one transposing copy
        np.copyto(out[:, c], rgb01[c], casting="unsafe")


# --------------------------------------------------------------------------- tissue detection
def _weight_from_lab(lab: np.ndarray, cfg: TissueConfig, out: np.ndarray | None = None,
                     tmp: np.ndarray | None = None) -> np.ndarray:
    """Soft tissue weight from a ``3 x ...`` float32 LAB array (see :func:`tissue_weight`), into
    ``out`` (with scratch ``tmp``, both shaped like ``lab[0]``) when given."""
    L, a, b = lab
    out = np.empty_like(L) if out is None else out
    tmp = np.empty_like(L) if tmp is None else tmp
    np.multiply(a, a, out=tmp)  # tmp = chroma
    np.multiply(b, b, out=out)
    tmp += out
    np.sqrt(tmp, out=tmp)
    f32 = np.float32
    if cfg.ramp > 0:
        inv = f32(1.0 / cfg.ramp)
        np.subtract(f32(cfg.bright_chroma), tmp, out=tmp)  # grey = clip((bc - C) / ramp + 1/2)
        tmp *= inv
        tmp += f32(0.5)
        np.clip(tmp, f32(0), f32(1), out=tmp)
        np.subtract(L, f32(cfg.bright_l), out=out)  # bright = clip((L - bright_l) / ramp + 1/2)
        out *= inv
        out += f32(0.5)
        np.clip(out, f32(0), f32(1), out=out)
        tmp *= out
        np.subtract(f32(1.0), tmp, out=tmp)  # 1 - bright * grey
        np.subtract(L, f32(cfg.dark_l), out=out)  # dark_ok = clip((L - dark_l) / ramp + 1/2)
        out *= inv
        out += f32(0.5)
        np.clip(out, f32(0), f32(1), out=out)
    else:
        np.less_equal(tmp, cfg.bright_chroma, out=tmp, casting="unsafe")  # grey
        np.greater_equal(L, cfg.bright_l, out=out, casting="unsafe")  # bright
        tmp *= out
        np.subtract(f32(1.0), tmp, out=tmp)
        np.greater(L, cfg.dark_l, out=out, casting="unsafe")  # dark_ok
    out *= tmp
    return out


def _mask_from_lab(lab: np.ndarray, cfg: TissueConfig) -> np.ndarray:
    L, a, b = lab
    white = (L >= cfg.bright_l) & (np.sqrt(a * a + b * b) <= cfg.bright_chroma)
    return (L > cfg.dark_l) & ~white


def tissue_weight(rgb: np.ndarray, cfg: TissueConfig | None = None) -> np.ndarray:
    """Soft tissue weight (float32 HxW in [0, 1]): 0 on clear background, 1 on clear tissue.

    ``w = clip((L - dark_l)/ramp + 1/2) * (1 - clip((L - bright_l)/ramp + 1/2)
    * clip((bright_chroma - C)/ramp + 1/2))``, i.e. linear ramps centred on the thresholds of
    :func:`tissue_mask`.
    """
    cfg = cfg or TissueConfig()
    return _weight_from_lab(_lab_planes(_check_rgb(rgb)), cfg)


def tissue_mask(rgb: np.ndarray, cfg: TissueConfig | None = None) -> np.ndarray:
    """Boolean HxW tissue mask: not dark (``L > dark_l``) and not white glass
    (``L >= bright_l`` with ``C <= bright_chroma``). Handles black (DCI) and white (H&E)
    backgrounds with the default :class:`TissueConfig`."""
    cfg = cfg or TissueConfig()
    return _mask_from_lab(_lab_planes(_check_rgb(rgb)), cfg)
