"""Low-level pixel sources for :mod:`.slides`: TIFF levels read by window, Pillow images decoded once.

* :class:`_TiffLevel`: one resolution level of a TIFF series. Single-page tiled or stripped levels
  are read tile by tile straight from the file (:class:`_Segments`, thread-safe); uncompressed
  contiguous ones are memory-mapped; anything else goes through tifffile's zarr store.
* :func:`_pil_open` / :func:`_pil_decode`: PNG and JPEG, size checked against ``max_pixels``
  before anything is decoded.

Every failure to read becomes a :class:`~diffusiondci.errors.UserInputError` naming the file.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from diffusiondci.errors import UserInputError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_FORMATS = ("PNG", "JPEG")
_PIL_LOCK = threading.Lock()


def _unreadable(path: Path, reason: object) -> UserInputError:
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return UserInputError(f"cannot read image: {reason}; re-export the file", path)


def _check_max_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    n = int(height) * int(width)
    if n > max_pixels:
        raise UserInputError(
            f"image is {width}x{height} = {n:,} pixels, above the limit of {max_pixels:,} "
            f"(decompression-bomb guard); if you trust this file, raise it with --max-pixels {n}",
            path,
        )



def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC



class _Segments:
    """Window reads of a single-page tiled or stripped TIFF, straight from the file.

    Only the tiles/strips the window touches are read (``os.pread``: no shared file position, so
    any number of threads may read at once) and decoded by tifffile's decoder for the page (the
    codecs release the GIL). This is several times faster than going through zarr for the
    region-by-region reads of ``prepare`` and ``segment``.
    """

    @staticmethod
    def supports(page, axes: str) -> bool:
        return (axes in ("YX", "YXS") and page.imagedepth == 1 and page.tiledepth == 1
                and (page.planarconfig == 1 or page.samplesperpixel == 1)
                and (page.is_tiled or page.rowsperstrip >= 1))

    def __init__(self, path: Path, page, dtype: np.dtype):
        self.path = path
        if page.is_tiled:
            self.th, self.tw = int(page.tilelength), int(page.tilewidth)
        else:
            self.th, self.tw = min(int(page.rowsperstrip), int(page.imagelength)), int(page.imagewidth)
        self.nx = -(-int(page.imagewidth) // self.tw)
        self.samples = int(page.samplesperpixel)
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.decode = page.decode
        self.kwargs = {"_fullsize": bool(page.is_tiled)}
        if page.compression in (6, 7, 34892, 33007):  # JPEG variants
            self.kwargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read(self, y0: int, y1: int, x0: int, x1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Pixels of rows [y0, y1) and columns [x0, x1), into ``out`` when given (same shape)."""
        shape = (y1 - y0, x1 - x0) + ((self.samples,) if self.samples > 1 else ())
        out = np.empty(shape, self.dtype) if out is None else out
        th, tw = self.th, self.tw
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * self.nx + tx
                count = self.counts[index] if index < len(self.counts) else 0
                sy, sx = ty * th, tx * tw
                if not count:  # an empty tile reads as zeros
                    out[max(y0, sy) - y0 : min(y1, sy + th) - y0, max(x0, sx) - x0 : min(x1, sx + tw) - x0] = 0
                    continue
                try:
                    data = os.pread(self.fd, count, self.offsets[index])
                    segment = self.decode(data, index, **self.kwargs)[0]
                except MemoryError:
                    raise
                except Exception as exc:  # decoder errors of any codec: a damaged file
                    raise _unreadable(self.path, exc) from exc
                segment = segment.reshape(segment.shape[1], segment.shape[2], -1)  # (rows, cols, S)
                ys, ye = max(y0, sy), min(y1, sy + segment.shape[0])
                xs, xe = max(x0, sx), min(x1, sx + segment.shape[1])
                part = segment[ys - sy : ye - sy, xs - sx : xe - sx]
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = part if self.samples > 1 else part[..., 0]
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _TiffLevel:
    """One resolution level of a TIFF series, read lazily; yields (h, w) or (h, w, S) arrays."""

    def __init__(self, path: Path, tif, series, level: int):
        import zarr

        self.path = path
        lev = series.levels[level]
        shape, axes = tuple(lev.shape), lev.axes
        keep = [i for i, (a, n) in enumerate(zip(axes, shape)) if a in "YX" or n != 1]
        self.axes = "".join(axes[i] for i in keep)
        self._prefix = tuple(0 if i not in keep else slice(None) for i in range(len(axes)))
        self.shape = tuple(shape[i] for i in keep)
        self.dtype = np.dtype(lev.dtype)
        self.samples = shape[axes.index("S")] if "S" in self.axes else 1
        self.height = shape[axes.index("Y")] if "Y" in axes else 0
        self.width = shape[axes.index("X")] if "X" in axes else 0
        self._store = None
        self._segments = None
        self._lock = None
        pages = [p for p in lev.pages if p is not None]
        if lev.dataoffset is not None and len(pages) == 1 and pages[0].is_memmappable:
            # Uncompressed and contiguous: memory-map it rather than decode one whole-image chunk.
            dtype = self.dtype.newbyteorder(tif.byteorder)
            self._array = np.memmap(path, dtype=dtype, mode="r", offset=lev.dataoffset, shape=shape)
        elif len(pages) == 1 and _Segments.supports(pages[0], self.axes):
            self._segments = _Segments(path, pages[0], self.dtype)
        else:
            self._store = series.aszarr(level=level)
            self._array = zarr.open(self._store, mode="r")
            self._lock = threading.Lock()  # other layouts: one zarr read at a time

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._segments is not None:
            return self._segments.read(y0, y1, x0, x1)
        index, k = [], 0
        for item in self._prefix:
            if isinstance(item, int):
                index.append(item)
                continue
            axis = self.axes[k]
            k += 1
            index.append(slice(y0, y1) if axis == "Y" else slice(x0, x1) if axis == "X" else slice(None))
        try:
            if self._lock is not None:
                with self._lock:
                    data = np.asarray(self._array[tuple(index)])
            else:
                data = np.asarray(self._array[tuple(index)])
        except MemoryError:
            raise
        except Exception as exc:  # decoder errors of any codec: a damaged file
            raise _unreadable(self.path, exc) from exc
        if self.axes == "SYX":
            data = np.moveaxis(data, 0, -1)
        return data.astype(data.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._segments is not None:
            self._segments.close()
        self._array = None


def _open_tiff(path: Path):
    import tifffile

    tif = None
    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        levels = len(series.levels)
        size = path.stat().st_size
        for lev in series.levels:
            for page in lev.pages:
                if page is None:
                    continue
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > size:
                    raise ValueError(f"file is truncated ({size:,} bytes, data extends to {max(ends):,})")
    except Exception as exc:
        if tif is not None:
            tif.close()
        raise _unreadable(path, exc) from exc
    return tif, series, levels


def _pil_open(path: Path, max_pixels: int):
    """Open with Pillow after checking the header size; returns the (lazy) image."""
    from PIL import Image, UnidentifiedImageError

    with _PIL_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow raises above 2x, warns above 1x
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path, formats=_PIL_FORMATS)
        except Image.DecompressionBombError as exc:
            raise UserInputError(
                f"image is larger than the limit of {max_pixels:,} pixels (decompression-bomb "
                "guard); if you trust this file, raise it with --max-pixels",
                path,
            ) from exc
        except UnidentifiedImageError as exc:
            raise _unreadable(path, "not a TIFF, PNG or JPEG image") from exc
        except Exception as exc:
            raise _unreadable(path, exc) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    width, height = im.size
    try:
        _check_max_pixels(path, height, width, max_pixels)
    except UserInputError:
        im.close()
        raise
    return im


def _pil_decode(path: Path, im, mode: str | None) -> np.ndarray:
    try:
        with im:
            im.load()
            return np.asarray(im.convert(mode) if mode and im.mode != mode else im)
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from exc
