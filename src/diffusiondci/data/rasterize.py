"""``diffusiondci rasterize``: QuPath GeoJSON annotations -> label images.

``evaluate-seg`` compares predictions with label images (``<stem>_mask.png``: 0 background,
1 benign, 2 malignant). Slides annotated in QuPath have a ``<stem>.geojson`` instead; this turns it
into that label image, at the slide's size or at 1/K of it (``downsample``, matching ``segment
--label-downsample``). Pixels take the label of the polygon containing their centre, exactly the
rule ``prepare`` uses for patches, and the image is built in row bands (a 21k x 21k slide needs
~450 MB for its full-size mask, not more).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from .annotations import load_class_map, load_geojson
from .imageio import find_images, write_png_atomic
from .slides import DEFAULT_MAX_PIXELS, open_slide

__all__ = ["rasterize_annotation", "rasterize_paths"]

BAND_ROWS = 512


def rasterize_annotation(slide_path: str | Path, geojson_path: str | Path, out_path: str | Path,
                         class_map: dict[str, int] | None = None, downsample: int = 1,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Write the label image of ``geojson_path`` for slide ``slide_path`` (its size / ``downsample``)."""
    k = int(downsample)
    if k < 1:
        raise UserInputError(f"--downsample must be >= 1, got {downsample}")
    with open_slide(slide_path, max_pixels=max_pixels) as slide:
        height, width = int(slide.height), int(slide.width)
    annotation = load_geojson(geojson_path, class_map)
    annotation.warn_if_outside(height, width)
    out_h, out_w = math.ceil(height / k), math.ceil(width / k)
    mask = np.zeros((out_h, out_w), np.uint8)
    for y in range(0, out_h, BAND_ROWS):
        rows = min(BAND_ROWS, out_h - y)
        # output pixel (i, j) samples slide point ((j + 0.5) k, (y + i + 0.5) k), as segment does
        mask[y:y + rows] = annotation.rasterize(0, y * k, out_w * k, rows * k, rows, out_w)
    return write_png_atomic(out_path, mask)


def rasterize_paths(inputs: Iterable[str | Path], out_dir: str | Path, annotations: str | Path | None = None,
                    class_map_file: str | Path | None = None, downsample: int = 1,
                    max_pixels: int = DEFAULT_MAX_PIXELS, log: Callable[[str], None] | None = None) -> list[Path]:
    """``out_dir/<stem>_mask.png`` for every slide of ``inputs`` that has a ``<stem>.geojson`` (in
    ``annotations``, else beside the slide). Slides without one are listed and skipped; none at all
    is an error. Returns the written files."""
    slides = find_images(inputs)
    class_map = load_class_map(class_map_file) if class_map_file is not None else None
    folders = [Path(annotations)] if annotations is not None else []
    pairs, missing = [], []
    for slide in slides:
        candidates = [f / f"{slide.stem}.geojson" for f in folders] + [slide.parent / f"{slide.stem}.geojson"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(slide.name)
        else:
            pairs.append((slide, found))
    if not pairs:
        where = f" in {annotations} or" if annotations is not None else ""
        raise UserInputError(f"no <stem>.geojson found{where} beside the {len(slides)} slide(s) given")
    if missing and log is not None:
        log(f"no GeoJSON for {len(missing)} slide(s), skipped: {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}")
    written = []
    for n, (slide, geojson) in enumerate(pairs, start=1):
        out = rasterize_annotation(slide, geojson, Path(out_dir) / f"{slide.stem}_mask.png", class_map, downsample,
                                   max_pixels)
        written.append(out)
        if log is not None:
            log(f"[{n}/{len(pairs)}] {geojson.name} -> {out}")
    return written
