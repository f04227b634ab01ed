"""Tiling pictures into one grid image (the contact sheet and progression strip of ``sample``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def make_grid(rows: Sequence[Sequence[np.ndarray | None]], gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile ``H x W x 3`` uint8 pictures row by row (``None`` = a grey placeholder tile)."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("nothing to tile")
    h, w = tiles[0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + gap, 3), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[y : y + h, x : x + w] = 128 if tile is None else tile[:h, :w]
    return out
