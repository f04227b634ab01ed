"""Validated image I/O for patch datasets (ROI images and their masks).

Reading goes through the same validation as whole slides (:mod:`diffusiondci.data.slides`):
pixel limit, RGB check, readable file, mask size and labels {0, 1, 2}. Writing is atomic so an
interrupted run never leaves a half-written PNG behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from diffusiondci.data.slides import DEFAULT_MAX_PIXELS, _open_labels, open_slide
from diffusiondci.errors import UserInputError

__all__ = ["IMAGE_SUFFIXES", "find_images", "read_mask", "read_rgb", "write_png_atomic"]

#: File name suffixes treated as images when scanning dataset folders (compare lower-cased).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Stems of files in an input folder that are not slides (annotations and the toolkit's own outputs).
SKIP_STEM_SUFFIXES = ("_mask", "_labels", "_overlay")


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a whole RGB image as ``uint8 H x W x 3`` (alpha dropped, 16 bit rescaled)."""
    with open_slide(path, max_pixels=max_pixels) as slide:
        return slide.read_region(0, 0, slide.width, slide.height)


def read_mask(
    path: str | os.PathLike,
    expected_hw: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a label mask as ``uint8 H x W`` with labels 0 background, 1 benign, 2 malignant.

    ``expected_hw`` (height, width), when given, must match the mask size exactly.
    """
    with _open_labels(path, max_pixels) as labels:
        if expected_hw is not None and (labels.height, labels.width) != tuple(expected_hw):
            h, w = expected_hw
            raise UserInputError(
                f"mask is {labels.height}x{labels.width} (height x width) but its image is "
                f"{h}x{w}; export the mask at the image's resolution",
                path,
            )
        return labels.read_region(0, 0, labels.width, labels.height)


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary sibling, fsync, :func:`os.replace`)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=sort_keys, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_png_atomic(path: str | os.PathLike, array: np.ndarray, compress_level: int = 6) -> Path:
    """Write a ``uint8`` ``H x W`` (mask) or ``H x W x 3`` (RGB) array as PNG, atomically.

    The PNG is written to a temporary file in the destination folder and moved into place with
    :func:`os.replace`, so readers see either the old file or the complete new one.
    ``compress_level`` is zlib's (1 fastest, 9 smallest; Pillow's default 6).
    """
    from PIL import Image

    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected uint8 HxW or HxWx3, got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name (not mkstemp, whose 0600 mode would leak into the final file).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            Image.fromarray(np.ascontiguousarray(array)).save(fh, format="PNG", compress_level=compress_level)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, plus those in the named folders (not recursive; files whose
    stem ends in ``_mask``, ``_labels`` or ``_overlay`` are skipped). Stems must be unique."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(
                p for p in item.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.stem.endswith(SKIP_STEM_SUFFIXES)
            ))
        elif item.is_file():
            found.append(item)
        else:
            raise UserInputError("no such file or folder; give slide images or folders of them", item)
    if not found:
        raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in "
                             f"{', '.join(str(p) for p in map(Path, inputs))}")
    seen: dict[str, Path] = {}
    for path in found:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise UserInputError(f"two inputs have the stem '{path.stem}' ({seen[path.stem]}); their "
                                 "outputs would collide: rename one or process them separately", path)
        seen[path.stem] = path
    return list(dict.fromkeys(seen.values()))
