"""Lazy readers for whole DCI slides and their label masks.

Whole slide DCI images range from 2592 x 2592 to 21024 x 21024 RGB pixels (paper, Sec. V-A "Dataset"),
so they are never decoded whole when the format allows otherwise:

* TIFF (plain, tiled or pyramidal, BigTIFF): :meth:`Slide.read_region` decodes only the tiles
  or strips the window touches, read straight from the file for single-page levels and through
  tifffile's zarr store (``aszarr``) otherwise. Uncompressed contiguous TIFFs are memory-mapped
  instead (a single strip would otherwise be one giant chunk). Reads are thread-safe (the pixel
  sources are in :mod:`.image_sources`). Layouts ``Y X S`` and planar ``S Y X`` with 3 (RGB) or 4 (RGBA,
  alpha dropped) samples are accepted; 16-bit samples are rescaled to 8 bit (value / 257) with a
  warning.
* PNG / JPEG cannot be read by region: the header size is checked against ``max_pixels`` before
  anything is decoded, then the image is decoded once and served by region from memory.

Every file is untrusted: sizes above ``max_pixels`` (decompression bombs), non-RGB slides,
truncated or unreadable files, mask size mismatches and labels outside {0, 1, 2} raise
:class:`~diffusiondci.errors.UserInputError` naming the file and saying what to do.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diffusiondci.errors import UserInputError

from .image_sources import (
    _check_max_pixels, _is_tiff, _open_tiff, _pil_decode, _pil_open, _TiffLevel, _unreadable,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LabelImage",
    "Slide",
    "check_label_image",
    "open_label_image",
    "open_slide",
    "slide_size",
    "validate_labels",
]

#: Decompression-bomb limit (width x height); raise it with ``--max-pixels``.
DEFAULT_MAX_PIXELS = 30_000 * 30_000

#: Valid mask labels: 0 background, 1 benign, 2 malignant.
VALID_LABELS = (0, 1, 2)

_THUMB_BUDGET_BYTES = 8 * 2**20  # uint8 rows read at once by Slide.thumbnail

# A reader returns the pixels of rows [y0, y1) and columns [x0, x1) (already clipped to the image).
_Reader = Callable[[int, int, int, int], np.ndarray]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserInputError("file not found; check the path", path)
    return path



def validate_labels(array: np.ndarray, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`UserInputError` unless every value of ``array`` is a label in {0, 1, 2}."""
    array = np.asarray(array)
    if array.dtype == bool:
        return
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.isin(array, VALID_LABELS)):
            return
        raise UserInputError(
            f"mask has non-integer pixel type {array.dtype}; mask labels must be 0 background, "
            "1 benign, 2 malignant",
            path,
        )
    if array.size == 0 or (array.min() >= 0 and array.max() <= 2):
        return
    bad = np.unique(array[(array < 0) | (array > 2)])
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    raise UserInputError(
        f"mask contains label values {shown}; mask labels must be 0 background, 1 benign, "
        "2 malignant (re-export the mask with these values)",
        path,
    )


# --------------------------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------------------------


class _Region(abc.ABC):
    """Shared window logic: windows may extend past the border; outside pixels are ``fill``."""

    path: Path
    height: int
    width: int
    _channels: int  # 3 for slides, 0 for label images (2-D)

    @abc.abstractmethod
    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of rows [y0, y1) and columns [x0, x1), all inside the image."""

    def read_region(self, x: int, y: int, w: int, h: int, fill: int | Sequence[int] = 0,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Return the ``h x w`` window whose top-left corner is ``(x, y)`` (column, row).

        The window may extend beyond the image (or lie entirely outside it); those pixels are
        ``fill``. ``out`` (uint8, the window's shape) receives the pixels instead of a new array:
        reusing one buffer for many windows saves allocating (and page-faulting) each of them.
        """
        w, h = _check_positive_int("w", w), _check_positive_int("h", h)
        x, y = int(x), int(y)
        shape = (h, w, self._channels) if self._channels else (h, w)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[...] = fill
        if x0 < x1 and y0 < y1:
            self._read_into(out[y0 - y : y1 - y, x0 - x : x1 - x], y0, y1, x0, x1)
        return out

    def _read_into(self, dst: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        dst[...] = self._read_inside(y0, y1, x0, x1)

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, height={self.height}, width={self.width})"


def _to_rgb8(path: Path, data: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) uint8/uint16 -> (h, w, 3) uint8 (alpha dropped, 16 bit rescaled by 1/257)."""
    data = data[..., :3]
    if data.dtype == np.uint8:
        return data
    if data.dtype == np.uint16:
        return ((data.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise UserInputError(f"unsupported pixel type {data.dtype}; convert to 8-bit RGB", path)


def _area_downsample(
    read: _Reader, height: int, width: int, factor: int, channels: int = 3
) -> np.ndarray:
    """Mean over ``factor x factor`` blocks, reading full-width bands of rows one at a time.

    Each band (a multiple of ``factor`` rows, about ``_THUMB_BUDGET_BYTES`` of uint8) is reduced
    one block row at a time, so memory stays at one band plus one float block row. The last
    row/column blocks may be partial; they average only the pixels that exist.
    """
    from skimage.measure import block_reduce

    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    out = np.empty((out_h, out_w, channels), np.uint8)
    rows = factor * max(1, _THUMB_BUDGET_BYTES // (factor * width * channels))
    for y0 in range(0, height, rows):
        band = read(y0, min(y0 + rows, height), 0, width)
        for r0 in range(0, band.shape[0], factor):
            block_row = band[r0 : r0 + factor].astype(np.float32)
            if block_row.shape[0] % factor or width % factor:
                mean = block_reduce(block_row, (factor, factor, 1), func=np.nanmean, cval=np.nan)
            else:
                mean = block_reduce(block_row, (factor, factor, 1), func=np.mean)
            out[(y0 + r0) // factor] = np.clip(np.rint(mean[0]), 0, 255)
    return out


class Slide(_Region):
    """An open RGB whole slide; use :func:`open_slide` and ``with`` to close it.

    Attributes: ``path``, ``height``, ``width`` (of the full-resolution level).
    """

    _channels = 3

    def __init__(self, path: Path, levels: list[tuple[int, int, _Reader]], close: Callable[[], None],
                 read_into: Callable[..., np.ndarray] | None = None):
        self.path = path
        self.height, self.width = levels[0][0], levels[0][1]
        self._levels = levels  # (height, width, read) per pyramid level, finest first
        self._close = close
        self._read_level0_into = read_into  # (y0, y1, x0, x1, out=) for 8-bit RGB tiled levels

    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._levels[0][2](y0, y1, x0, x1)

    def _read_into(self, dst: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        if self._read_level0_into is not None:
            self._read_level0_into(y0, y1, x0, x1, out=dst)
        else:
            dst[...] = self._read_inside(y0, y1, x0, x1)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """Area-averaged RGB overview whose longest side is at most ``max_side``.

        Starts from the coarsest pyramid level that is still at least ``max_side`` long (level 0
        when there is no pyramid) and reduces it by an integer factor band by band, so the whole
        slide is never held in memory. Slides already smaller than ``max_side`` are returned whole.
        """
        max_side = _check_positive_int("max_side", max_side)
        level = self._levels[0]
        for lev in self._levels[1:]:
            if max(lev[0], lev[1]) >= max_side:
                level = lev
        h, w, read = level
        factor = max(1, math.ceil(max(h, w) / max_side))
        if factor == 1:
            return read(0, h, 0, w).copy()
        return _area_downsample(read, h, w, factor)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def _rgb_tiff_level(path: Path, level: _TiffLevel) -> _Reader:
    if level.axes not in ("YXS", "SYX") or level.samples not in (3, 4):
        kind = "greyscale" if level.axes == "YX" else f"axes {level.axes}, shape {level.shape}"
        raise UserInputError(
            f"not an RGB slide ({kind}); convert to RGB (8-bit, 3 channels) and retry", path
        )
    if level.dtype not in (np.uint8, np.uint16):
        raise UserInputError(f"unsupported pixel type {level.dtype}; convert to 8-bit RGB", path)
    return lambda y0, y1, x0, x1: _to_rgb8(path, level.read(y0, y1, x0, x1))


def _pil_open_rgb(path: Path, max_pixels: int):
    im = _pil_open(path, max_pixels)
    if im.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        im.close()
        raise UserInputError(
            f"not an RGB slide (image mode {im.mode}); convert to RGB (8-bit, 3 channels) and retry", path
        )
    return im


def slide_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of a slide, with the checks of :func:`open_slide` that need no pixels
    (readable header, RGB, pixel limit); PNG/JPEG are not decoded. For checking inputs up front."""
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    path = _resolve(path)
    if not _is_tiff(path):
        im = _pil_open_rgb(path, max_pixels)
        im.close()
        return im.size[1], im.size[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 16-bit note comes when the slide is read
        with open_slide(path, max_pixels) as slide:
            return slide.height, slide.width


def open_slide(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Slide:
    """Open a whole slide (TIFF, PNG or JPEG) for lazy, region-wise reading.

    Raises :class:`UserInputError` for missing/unreadable/truncated files, non-RGB images and
    images with more than ``max_pixels`` pixels.
    """
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    path = _resolve(path)
    if not _is_tiff(path):
        im = _pil_open_rgb(path, max_pixels)
        array = _pil_decode(path, im, "RGB")
        return Slide(
            path,
            [(array.shape[0], array.shape[1], lambda y0, y1, x0, x1: array[y0:y1, x0:x1])],
            close=lambda: None,
        )

    tif, series, n_levels = _open_tiff(path)
    opened: list[_TiffLevel] = []

    def close() -> None:
        for lev in opened:
            lev.close()
        tif.close()

    try:
        base = _TiffLevel(path, tif, series, 0)
        opened.append(base)
        _check_max_pixels(path, base.height, base.width, max_pixels)
        levels = [(base.height, base.width, _rgb_tiff_level(path, base))]
        for i in range(1, n_levels):
            lev = _TiffLevel(path, tif, series, i)
            opened.append(lev)
            if lev.axes == base.axes and lev.samples == base.samples:
                levels.append((lev.height, lev.width, _rgb_tiff_level(path, lev)))
    except UserInputError:
        close()
        raise
    except Exception as exc:
        close()
        raise _unreadable(path, exc) from exc
    if base.dtype == np.uint16:
        warnings.warn(f"{path}: 16-bit slide rescaled to 8 bit (value / 257)", UserWarning, stacklevel=2)
    direct = base._segments is not None and base.dtype == np.uint8 and base.axes == "YXS" and base.samples == 3
    return Slide(path, levels, close, read_into=base._segments.read if direct else None)


# --------------------------------------------------------------------------------------------
# Label images
# --------------------------------------------------------------------------------------------


class LabelImage(_Region):
    """An open single-channel label mask (0 background, 1 benign, 2 malignant), read lazily.

    :meth:`read_region` returns ``uint8 (h, w)`` and validates the labels of every region read.
    """

    _channels = 0

    def __init__(self, path: Path, height: int, width: int, read: _Reader, close: Callable[[], None]):
        self.path, self.height, self.width = path, height, width
        self._read, self._close = read, close

    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        data = self._read(y0, y1, x0, x1)
        if data.ndim == 3:  # RGB(A) mask: accepted only when the colour channels are equal
            rgb = data[..., :3]
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise UserInputError(
                    "mask is a colour image; save it as a single-channel image with labels "
                    "0 background, 1 benign, 2 malignant",
                    self.path,
                )
            data = rgb[..., 0]
        validate_labels(data, self.path)
        return data.astype(np.uint8, copy=False)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def _open_labels(path: str | os.PathLike, max_pixels: int, header_only: bool = False):
    """Open a label image without checking its size against a slide (``header_only``: return its
    ``(height, width)`` after the checks that need no pixels)."""
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    path = _resolve(path)
    not_single = (
        "mask is not a single-channel label image ({}); save it as a greyscale image with "
        "labels 0 background, 1 benign, 2 malignant"
    )
    if not _is_tiff(path):
        im = _pil_open(path, max_pixels)
        if im.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "RGB", "RGBA"):
            im.close()
            raise UserInputError(not_single.format(f"image mode {im.mode}"), path)
        if header_only:
            im.close()
            return im.size[1], im.size[0]
        array = _pil_decode(path, im, None)
        if array.dtype == bool:
            array = array.astype(np.uint8)
        return LabelImage(
            path, array.shape[0], array.shape[1],
            lambda y0, y1, x0, x1: array[y0:y1, x0:x1], close=lambda: None,
        )

    tif, series, _ = _open_tiff(path)
    try:
        level = _TiffLevel(path, tif, series, 0)
        _check_max_pixels(path, level.height, level.width, max_pixels)
        if not (level.axes == "YX" or (level.axes in ("YXS", "SYX") and level.samples in (3, 4))):
            raise UserInputError(not_single.format(f"axes {level.axes}"), path)
    except Exception as exc:
        tif.close()
        if isinstance(exc, UserInputError):
            raise
        raise _unreadable(path, exc) from exc

    def close() -> None:
        level.close()
        tif.close()

    if header_only:
        close()
        return level.height, level.width

    return LabelImage(path, level.height, level.width, level.read, close)


def open_label_image(
    path: str | os.PathLike, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LabelImage:
    """Open the label mask of a ``height x width`` slide; the sizes must match exactly."""
    labels = _open_labels(path, max_pixels)
    try:
        _check_mask_size(path, (labels.height, labels.width), height, width)
    except UserInputError:
        labels.close()
        raise
    return labels


def check_label_image(path: str | os.PathLike, height: int, width: int,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The header checks of :func:`open_label_image` (format, single channel, size equal to the
    slide's), without decoding pixels. For checking inputs up front."""
    _check_mask_size(path, _open_labels(path, max_pixels, header_only=True), height, width)


def _check_mask_size(path, size: tuple[int, int], height: int, width: int) -> None:
    if tuple(size) != (height, width):
        raise UserInputError(
            f"mask is {size[0]}x{size[1]} (height x width) but the slide is "
            f"{height}x{width}; export the mask at the slide's full resolution",
            path,
        )
