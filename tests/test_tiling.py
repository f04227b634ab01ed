"""Tests for the ROI grid and acquisition-tile helpers (diffusiondci.data.tiling)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusiondci.data.tiling import axis_starts, roi_grid, tile_bounds, tile_grid_shape, tile_index


def paint(height, width, corners, roi):
    """Coverage count per pixel (window parts outside the slide are clipped away)."""
    cover = np.zeros((height, width), np.int32)
    for x, y in corners:
        cover[y : y + roi, x : x + roi] += 1
    return cover


# (n, roi, stride) cases with stride < roi, == roi, > roi, exact fits, remainders and n < roi.
CASES = [
    (10, 4, 3), (11, 4, 3), (10, 4, 2), (12, 4, 4), (13, 4, 4), (4, 4, 2),
    (3, 4, 2), (17, 5, 7), (20, 5, 7), (21, 5, 7), (23, 5, 7), (100, 32, 32), (101, 32, 16),
]


def test_hand_computed_starts():
    # n=11, roi=4, stride=3: regular 0,3,6 (6+4=10 < 11: one pixel left over).
    assert axis_starts(11, 4, 3, "drop") == [0, 3, 6]
    assert axis_starts(11, 4, 3, "shift") == [0, 3, 6, 7]
    assert axis_starts(11, 4, 3, "pad") == [0, 3, 6, 9]
    # exact fit: no extra window in any mode
    for edge in ("drop", "shift", "pad"):
        assert axis_starts(10, 4, 3, edge) == [0, 3, 6]
        assert axis_starts(10, 4, 2, edge) == [0, 2, 4, 6]
    # paper: 21024 px slide, 3450 px ROIs, stride 3450 -> 6 ROIs, 324 px lost with "drop"
    assert axis_starts(21024, 3450, 3450, "drop") == [0, 3450, 6900, 10350, 13800, 17250]
    assert axis_starts(21024, 3450, 3450, "shift")[-1] == 21024 - 3450
    assert axis_starts(21024, 3450, 3450, "pad")[-1] == 20700
    # gapped grid (stride > roi): n=23, roi=5, stride=7 -> 0, 7, 14 (21+5 > 23); the next
    # regular start 21 < 23 is a remainder
    assert axis_starts(23, 5, 7, "drop") == [0, 7, 14]
    assert axis_starts(23, 5, 7, "shift") == [0, 7, 14, 18]
    assert axis_starts(23, 5, 7, "pad") == [0, 7, 14, 21]
    # n=21: next start 21 is outside, pixels 19, 20 are an ordinary gap -> no extra window
    assert axis_starts(21, 5, 7, "pad") == [0, 7, 14]
    assert axis_starts(21, 5, 7, "shift") == [0, 7, 14]
    # slide smaller than the ROI
    assert axis_starts(3, 4, 2, "drop") == []
    assert axis_starts(3, 4, 2, "shift") == [0]
    assert axis_starts(3, 4, 2, "pad") == [0]


@pytest.mark.parametrize("n, roi, stride", CASES)
def test_drop_counts_and_coverage(n, roi, stride):
    expected_count = (n - roi) // stride + 1 if n >= roi else 0
    starts = axis_starts(n, roi, stride, "drop")
    assert len(starts) == expected_count
    assert all(s + roi <= n for s in starts)
    corners = roi_grid(n, n + 3, roi, stride, "drop")
    assert len(corners) == expected_count * len(axis_starts(n + 3, roi, stride, "drop"))
    if stride <= roi and expected_count:
        cover = paint(n, n, roi_grid(n, n, roi, stride, "drop"), roi)
        end = (expected_count - 1) * stride + roi
        assert (cover[:end, :end] > 0).all()
        assert (cover[end:, :] == 0).all() and (cover[:, end:] == 0).all()


@pytest.mark.parametrize("n, roi, stride", CASES)
def test_shift_covers_everything_and_stays_inside(n, roi, stride):
    height, width = n, n + 5
    corners = roi_grid(height, width, roi, stride, "shift")
    xs = axis_starts(width, roi, stride, "shift")
    ys = axis_starts(height, roi, stride, "shift")
    assert len(corners) == len(xs) * len(ys)
    if stride <= roi:
        assert (paint(height, width, corners, roi) > 0).all()
    for starts, length in ((xs, width), (ys, height)):
        assert starts == sorted(set(starts))
        if length >= roi:
            assert all(s + roi <= length for s in starts)  # never padded when the slide is big enough
        else:
            assert starts == [0]


@pytest.mark.parametrize("n, roi, stride", CASES)
def test_pad_covers_everything_on_the_stride_lattice(n, roi, stride):
    starts = axis_starts(n, roi, stride, "pad")
    assert all(s % stride == 0 for s in starts)
    assert all(s < n for s in starts)
    assert sum(s + roi > n for s in starts) <= 1  # only the last one may cross the border
    if stride <= roi:
        assert (paint(n, n, roi_grid(n, n, roi, stride, "pad"), roi) > 0).all()


def test_stride_larger_than_roi_leaves_gaps():
    cover = paint(20, 20, roi_grid(20, 20, 5, 7, "drop"), 5)
    line = cover[0]
    assert line.tolist() == [1] * 5 + [0] * 2 + [1] * 5 + [0] * 2 + [1] * 5 + [0]


def test_overlap_counts():
    # stride 2, roi 4 on 10 px: starts 0,2,4,6 -> pixel coverage 1,1,2,2,2,2,2,2,1,1 per axis
    cover = paint(10, 10, roi_grid(10, 10, 4, 2, "drop"), 4)
    per_axis = np.array([1, 1, 2, 2, 2, 2, 2, 2, 1, 1])
    np.testing.assert_array_equal(cover, np.outer(per_axis, per_axis))


def test_row_major_order():
    corners = roi_grid(8, 12, 4, 4, "drop")
    assert corners == [(0, 0), (4, 0), (8, 0), (0, 4), (4, 4), (8, 4)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=0, width=10, roi_size=4, stride=4),
        dict(height=10, width=10, roi_size=0, stride=4),
        dict(height=10, width=10, roi_size=4, stride=-1),
        dict(height=10, width=10, roi_size=4.0, stride=4),
        dict(height=10, width=10, roi_size=True, stride=4),
        dict(height=10, width=10, roi_size=4, stride=4, edge="wrap"),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        roi_grid(**kwargs)


def test_numpy_integers_accepted():
    assert roi_grid(np.int64(8), np.int32(8), np.int64(4), np.int64(4), "drop") == [
        (0, 0), (4, 0), (0, 4), (4, 4)
    ]


def test_acquisition_tiles_partition_the_slide():
    height, width, size = 70, 45, 16
    rows, cols = tile_grid_shape(height, width, size)
    assert (rows, cols) == (5, 3)
    owner = np.full((height, width), -1)
    for ty in range(rows):
        for tx in range(cols):
            y0, y1, x0, x1 = tile_bounds(ty, tx, size, height, width)
            assert (owner[y0:y1, x0:x1] == -1).all()  # no overlap
            owner[y0:y1, x0:x1] = ty * cols + tx
    assert (owner >= 0).all()
    for y, x in [(0, 0), (15, 15), (16, 0), (69, 44), (33, 40)]:
        ty, tx = tile_index(x, y, size)
        assert owner[y, x] == ty * cols + tx
    assert tile_bounds(4, 2, size, height, width) == (64, 70, 32, 45)
    with pytest.raises(ValueError):
        tile_bounds(5, 0, size, height, width)
    with pytest.raises(ValueError):
        tile_index(-1, 0, size)
