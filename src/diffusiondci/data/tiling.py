"""The sliding-window ROI grid over a whole slide, and acquisition-tile indexing.

The paper cuts ROIs of 3450 x 3450 pixels from each whole slide "using a sliding window
algorithm with steps of 3,450 pixels" (paper, Sec. V-A "Dataset"); :func:`roi_grid`
generalises this.

Grid along one axis of length ``n`` (``width`` for x, ``height`` for y), window ``r = roi_size``,
step ``s = stride``:

* Regular starts are ``0, s, 2s, ...`` while the window fits, i.e. ``k * s + r <= n``.
  Let ``last`` be the largest such start (none exist when ``n < r``).
* The grid *leaves a remainder* when ``last + max(r, s) < n``: for ``s <= r`` this means the
  pixels ``[last + r, n)`` are not covered; for ``s > r`` (gapped grid) it means the next regular
  start ``last + s`` still lies inside the slide.
* ``edge`` decides what happens to the remainder:

  - ``"drop"`` (the paper's behaviour): only regular windows. With ``m`` windows and ``s <= r``
    they cover exactly ``[0, (m - 1) * s + r)``; the last ``n - ((m - 1) * s + r)`` pixels are
    lost. A slide shorter than ``r`` gives no window.
  - ``"shift"``: one extra window flush with the border, start ``n - r`` (it overlaps the
    previous one). For ``s <= r`` the union of windows covers every pixel of the slide exactly
    once or more. A slide shorter than ``r`` gives one window at 0 (padded past the border).
  - ``"pad"``: one extra window at the next regular start ``last + s``; it extends past the
    border and :meth:`~diffusiondci.data.slides.Slide.read_region` fills the outside pixels.
    A slide shorter than ``r`` gives one window at 0 (padded).

:func:`roi_grid` returns the (x, y) top-left corners of the windows of both axes combined,
row-major (y outer, x inner).

Acquisition tiles (the scanner's ROI patches that colour normalisation treats one by one,
Sec. IV-B.1) form a plain non-overlapping grid: tile ``(ty, tx)`` covers rows
``[ty * tile_size, min((ty + 1) * tile_size, height))`` and the matching columns.
"""

from __future__ import annotations

import math
import operator

__all__ = ["EDGE_MODES", "axis_starts", "roi_grid", "tile_bounds", "tile_grid_shape", "tile_index"]

#: Accepted values of ``edge``.
EDGE_MODES = ("drop", "shift", "pad")


def _positive(name: str, value: object) -> int:
    try:
        number = operator.index(value)  # ints and numpy integers, not floats
    except TypeError:
        number = 0
    if isinstance(value, bool) or number <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def axis_starts(length: int, roi_size: int, stride: int, edge: str = "shift") -> list[int]:
    """Window starts along one axis of ``length`` pixels (see the module docstring)."""
    length = _positive("length", length)
    roi_size, stride = _positive("roi_size", roi_size), _positive("stride", stride)
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {', '.join(EDGE_MODES)}, got {edge!r}")
    if length < roi_size:
        return [] if edge == "drop" else [0]
    starts = list(range(0, length - roi_size + 1, stride))
    last = starts[-1]
    if edge != "drop" and last + max(roi_size, stride) < length:
        starts.append(length - roi_size if edge == "shift" else last + stride)
    return starts


def roi_grid(
    height: int, width: int, roi_size: int, stride: int, edge: str = "shift"
) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of the ROI windows over a ``height x width`` slide, row-major."""
    xs = axis_starts(width, roi_size, stride, edge)
    ys = axis_starts(height, roi_size, stride, edge)
    return [(x, y) for y in ys for x in xs]


def tile_grid_shape(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Number of acquisition tiles ``(rows, cols)``; border tiles may be partial."""
    tile_size = _positive("tile_size", tile_size)
    return math.ceil(_positive("height", height) / tile_size), math.ceil(_positive("width", width) / tile_size)


def tile_index(x: int, y: int, tile_size: int) -> tuple[int, int]:
    """Acquisition tile ``(ty, tx)`` containing pixel column ``x``, row ``y``."""
    tile_size = _positive("tile_size", tile_size)
    if x < 0 or y < 0:
        raise ValueError(f"pixel ({x}, {y}) has a negative coordinate")
    return int(y) // tile_size, int(x) // tile_size


def tile_bounds(ty: int, tx: int, tile_size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(y0, y1, x0, x1)`` of tile ``(ty, tx)``, clipped to the slide."""
    rows, cols = tile_grid_shape(height, width, tile_size)
    if not (0 <= ty < rows and 0 <= tx < cols):
        raise ValueError(f"tile ({ty}, {tx}) outside the {rows}x{cols} tile grid")
    return ty * tile_size, min((ty + 1) * tile_size, height), tx * tile_size, min((tx + 1) * tile_size, width)
