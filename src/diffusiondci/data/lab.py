"""sRGB <-> CIELAB in float32 numpy, fast on 8-bit pixels: the colour maths of :mod:`.color`.

The formulas and constants are kornia's (``kornia.color.rgb_to_lab`` / ``lab_to_rgb``: sRGB with
D65 white, the CIE 1976 ``f(t)`` with threshold 0.008856 and linear part ``7.787 t + 4/29``), so
results agree with kornia to float32 rounding (a few ulps). They are written out here rather than
called from kornia because colour normalisation runs them on every pixel of every slide (over a
gigapixel for a 21k x 21k slide): kornia allocates a full-size tensor per step and uses ``pow`` for
the sRGB curve, which made it ~10x slower, and importing torch alone costs ~220 MB of memory.
Here 8-bit input is linearised with a 256-entry table, the cube root is :func:`numpy.cbrt`, the
piecewise curves are evaluated without masks as ``curve(max(v, v0)) + slope * min(v - v0, 0)``
(exact above the knee ``v0``, within 1e-7 of kornia's linear part below it), and every step works
in place in the buffers of a :class:`Workspace` (one per thread; chunks of :data:`CHUNK_PX` pixels
stay in the CPU cache and nothing is allocated per chunk). numpy releases the GIL, so several
threads convert chunks at once.

Arrays are *planar*: ``lab`` is ``3 x N`` (L*, a*, b*) float32 for ``N`` pixels given as ``N x 3``.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["CHUNK_PX", "Workspace", "lab_from_rgb8", "lab_from_rgb_float", "rgb_from_lab", "workspace"]

#: Pixels converted at once by the callers' chunk loops (a workspace is ~11 planes of 256 KB).
CHUNK_PX = 1 << 16

_F32 = np.float32
_WHITE = np.array([0.95047, 1.0, 1.08883])
# linear RGB -> XYZ, each row divided by the white point's coordinate (XYZ / white in one step)
_RGB2XYZ = (np.array([[0.412453, 0.357580, 0.180423],
                      [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]]) / _WHITE[:, None]).astype(_F32)
# XYZ -> linear RGB, each column multiplied by the white point's coordinate
_XYZ2RGB = (np.array([[3.2404813432005266, -1.5371515162713185, -0.4985363261688878],
                      [-0.9692549499965682, 1.8759900014898907, 0.0415559265582928],
                      [0.0556466391351772, -0.2040413383665112, 1.0573110696453443]]) * _WHITE[None, :]).astype(_F32)
# the same with Y first (rows / columns): planes are kept in L*, a*, b* order, f(Y) drives L*
_RGB2XYZ_YXZ = np.ascontiguousarray(_RGB2XYZ[[1, 0, 2]])
_XYZ2RGB_YXZ = np.ascontiguousarray(_XYZ2RGB[:, [1, 0, 2]])
_T0 = _F32(0.008856)     # f(t): cube root above, 7.787 t + 4/29 below
_F0 = _F32(0.2068966)    # inverse of f: cube above, (f - 4/29) / 7.787 below
_K = _F32(7.787)
_LIN0 = _F32(0.0031308)  # linear -> sRGB: 12.92 x below, 1.055 x^(1/2.4) - 0.055 above
_GAMMA = _F32(1 / 2.4)


def _linear(v: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> linear RGB (float64 maths)."""
    v = np.asarray(v, np.float64)
    return np.where(v > 0.04045, ((np.maximum(v, 0) + 0.055) / 1.055) ** 2.4, v / 12.92)


#: Linear value of each 8-bit sRGB level.
_LIN8 = _linear(np.arange(256) / 255.0).astype(_F32)


class Workspace:
    """Scratch buffers for converting up to ``n`` pixels at a time (not shared between threads)."""

    def __init__(self, n: int = CHUNK_PX):
        self.n = n
        self.lab = np.empty((3, n), _F32)
        self.rgb = np.empty((3, n), _F32)
        self.tmp = np.empty(n, _F32)
        self.tmp2 = np.empty(n, _F32)
        self.weight = np.empty(n, _F32)


_local = threading.local()


def workspace(n: int) -> Workspace:
    """This thread's workspace, for up to ``n`` pixels (:data:`CHUNK_PX` or more)."""
    ws = getattr(_local, "ws", None)
    if ws is None or ws.n < n:
        ws = _local.ws = Workspace(max(n, CHUNK_PX))
    return ws


def _f_inplace(t: np.ndarray, tmp: np.ndarray) -> None:
    """``t <- f(t) = cbrt(max(t, t0)) + K (min(t, t0) - t0)`` (just ``cbrt`` when all ``t > t0``)."""
    if t.min(initial=np.inf) > _T0:
        np.cbrt(t, out=t)
        return
    np.minimum(t, _T0, out=tmp)
    tmp -= _T0
    tmp *= _K
    np.maximum(t, _T0, out=t)
    np.cbrt(t, out=t)
    t += tmp


def _lab_from_linear(lin: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    fy, fx, fz = out  # f(X), f(Y), f(Z) computed into the rows that end up L*, a*, b*
    np.einsum("ij,jn->in", _RGB2XYZ_YXZ, lin, out=out)
    for f in out:
        _f_inplace(f, tmp)
    np.subtract(fy, fz, out=fz)  # b* = 200 (fy - fz)
    fz *= _F32(200.0)
    np.subtract(fx, fy, out=fx)  # a* = 500 (fx - fy)
    fx *= _F32(500.0)
    fy *= _F32(116.0)            # L* = 116 fy - 16
    fy -= _F32(16.0)
    return out


def lab_from_rgb8(rgb: np.ndarray, ws: Workspace | None = None) -> np.ndarray:
    """``N x 3`` uint8 sRGB -> ``3 x N`` float32 CIELAB, in ``ws.lab`` (a view of it is returned;
    without ``ws`` a new workspace is made)."""
    n = len(rgb)
    ws = Workspace(n) if ws is None else ws
    lin = ws.rgb[:, :n]
    for c in range(3):
        np.take(_LIN8, rgb[:, c], out=lin[c], mode="clip")  # "clip": unbuffered (uint8 is in range)
    return _lab_from_linear(lin, ws.lab[:, :n], ws.tmp[:n])


def lab_from_rgb_float(rgb: np.ndarray) -> np.ndarray:
    """``N x 3`` float sRGB in [0, 1] -> ``3 x N`` float32 CIELAB (a new array)."""
    lin = np.ascontiguousarray(_linear(np.asarray(rgb, np.float64)).astype(_F32).T)
    return _lab_from_linear(lin, np.empty_like(lin), np.empty(lin.shape[1], _F32))


def rgb_from_lab(lab: np.ndarray, ws: Workspace | None = None) -> np.ndarray:
    """``3 x N`` CIELAB -> ``3 x N`` float32 sRGB clipped to [0, 1], in ``ws.rgb`` (a view of it
    is returned). ``lab`` is overwritten; it may be ``ws.lab``."""
    n = lab.shape[1]
    ws = Workspace(n) if ws is None else ws
    L, a, b = lab
    tmp = ws.tmp[:n]
    # f values: fy = (L + 16) / 116, fx = a / 500 + fy, fz = max(fy - b / 200, 0)
    L += _F32(16.0)
    L /= _F32(116.0)
    a /= _F32(500.0)
    a += L
    b /= _F32(200.0)
    np.subtract(L, b, out=b)
    np.maximum(b, _F32(0.0), out=b)
    cube = ws.tmp2[:n]
    for f in (a, L, b):  # XYZ relative to white: f^3 above F0, (f - 4/29) / 7.787 below
        low = not f.min(initial=np.inf) > _F0
        if low:
            np.minimum(f, _F0, out=tmp)
            tmp -= _F0
            tmp /= _K
            np.maximum(f, _F0, out=f)
        np.multiply(f, f, out=cube)
        f *= cube
        if low:
            f += tmp
    rgb = ws.rgb[:, :n]
    np.einsum("ij,jn->in", _XYZ2RGB_YXZ, lab, out=rgb)  # the rows of lab now hold Y, X, Z
    for out in rgb:
        # sRGB curve: 1.055 v^(1/2.4) - 0.055 above _LIN0, 12.92 v below
        if out.min(initial=np.inf) > _LIN0:
            np.power(out, _GAMMA, out=out)
            out *= _F32(1.055)
            out -= _F32(0.055)
            continue
        np.subtract(out, _LIN0, out=tmp)
        np.minimum(tmp, _F32(0.0), out=tmp)
        tmp *= _F32(12.92)
        np.maximum(out, _LIN0, out=out)
        np.power(out, _GAMMA, out=out)
        out *= _F32(1.055)
        out -= _F32(0.055)
        out += tmp
    np.clip(rgb, _F32(0.0), _F32(1.0), out=rgb)
    return rgb
