"""``diffusiondci segment``: whole-slide segmentation with a trained segmenter.

A slide goes through the same preprocessing as the training patches (``data/prepare.py``), then a
sliding window covers it:

1. **Scale.** A training patch is an ROI of ``roi_size`` slide pixels resized to ``patch_size``
   network pixels (PIL box filter), so the slide is box-downsampled by ``f = roi_size /
   patch_size`` into the *model-scale image* (``ceil(H / f) x ceil(W / f)``; model pixel ``(i, j)``
   covers the slide square ``[j f, (j+1) f) x [i f, (i+1) f)``). It is built chunk by chunk, each
   chunk a whole number of ROIs (about :data:`CHUNK_SLIDE_PX` slide pixels a side), so the
   full-resolution slide is never held whole (PNG/JPEG slides are decoded whole by the reader).
2. **Colour.** With the run's ``color_norm`` record enabled, the per-tile Reinhard statistics of
   *this* slide are measured exactly as ``prepare`` did (same tile size, tissue detector and
   subsampling) and each chunk is normalised at full resolution before resizing, to the target
   the training data used: the dataset target (``target_mode="dataset"``) or this slide's own
   tile average (``"slide"``).
3. **Inference.** :func:`monai.inferers.sliding_window_inference` (Gaussian blending of softmax
   probabilities; the part of a window past the image border is padded black, the DCI
   background) runs over horizontal bands of the model-scale image with a margin of one window
   above and below, so float memory is bounded by :data:`BAND_BYTES` whatever the slide size. The
   arg-max of the blended probabilities is the label.

Outputs for input ``<stem>`` (all written atomically): ``<stem>_labels.png`` (uint8 labels 0/1/2 at
the input's full size, or ``1/label_downsample`` of it; nearest-neighbour from the model scale,
pixel centres), ``<stem>_overlay.png`` (slide thumbnail, at most :data:`OVERLAY_MAX_SIDE` a side,
with benign and malignant regions tinted in the ``preview.colour_mask`` colours),
``<stem>.geojson`` (QuPath-importable benign/malignant polygons in slide pixels, lossless w.r.t.
the model-scale labels) and ``<stem>_areas.json`` (per-class areas in slide px^2 and their fractions
of the slide and of the tissue, with the run and settings used).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import shapely
import torch
from PIL import Image
from shapely.geometry import mapping, shape

from .. import CLASS_NAMES, __version__
from ..data import color
from ..data.annotations import mask_to_geojson, write_geojson
from ..data.imageio import find_images, write_json_atomic, write_png_atomic
from ..data.patch_dataset import to_tensor_image
from ..data.slides import DEFAULT_MAX_PIXELS, open_slide
from ..errors import UserInputError
from ..progress import progress_bar

__all__ = ["Segmenter", "find_images", "segment_paths", "segment_slide"]

#: Slide pixels (a side) read and colour-normalised at once; rounded down to whole ROIs (>= 1 ROI).
CHUNK_SLIDE_PX = 4096
#: Float memory budget of one inference band (input, blended probabilities, MONAI's weight map).
BAND_BYTES = 256 * 2**20
#: Longest side of the overlay picture.
OVERLAY_MAX_SIDE = 2048
#: Opacity of the class colour over benign and malignant pixels in the overlay (background untinted).
OVERLAY_ALPHA = 0.45


class Segmenter(Protocol):
    """What :func:`segment_slide` needs of a model run (``segmentation.run.load_segmenter``)."""

    run_dir: Path
    patch_size: int
    roi_size: int | None
    color_norm: dict | None
    num_classes: int

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h, w)`` float in [-1, 1] -> ``(N, num_classes, h, w)`` logits."""
        ...


# --------------------------------------------------------------------------- validation
def _check_settings(run: Segmenter, window: int | None, overlap: float, batch_size: int,
                    label_downsample: int) -> int:
    """Validate the options; returns the window side in model pixels."""
    window = int(run.patch_size) if window is None else window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise UserInputError(f"--window must be a positive number of model pixels, got {window!r}")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise UserInputError(f"--overlap must be in [0, 1), got {overlap!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserInputError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if (isinstance(label_downsample, bool) or not isinstance(label_downsample, (int, np.integer))
            or label_downsample < 1):
        raise UserInputError(f"--label-downsample must be a positive integer, got {label_downsample!r}")
    if run.roi_size is not None and int(run.roi_size) < 1:
        raise UserInputError(f"model run has roi_size {run.roi_size!r}; retrain it", run.run_dir)
    return int(window)


# --------------------------------------------------------------------------- geometry
class _Scale:
    """Slide <-> model-scale geometry: ``roi`` slide px become ``patch`` model px (f = roi/patch)."""

    def __init__(self, roi_size: int | None, patch_size: int):
        self.patch = int(patch_size)
        self.roi = self.patch if roi_size is None else int(roi_size)
        self.f = self.roi / self.patch
        k = max(1, CHUNK_SLIDE_PX // self.roi)
        self.chunk, self.model_chunk = k * self.roi, k * self.patch  # slide px -> model px

    def model_size(self, n: int) -> int:
        return max(1, -(-int(n) * self.patch // self.roi))

    def coverage(self, n_model: int, n_slide: int) -> np.ndarray:
        """Slide pixels covered by each model pixel along one axis (the last ones may be partial)."""
        edges = np.minimum(np.arange(n_model + 1) * self.f, n_slide)
        return np.diff(edges)


def _sample_labels(labels: np.ndarray, f: float, step: tuple[float, float],
                   out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of model-scale labels: output pixel ``(i, j)`` takes the model
    pixel under the slide point ``((j + 1/2) step_x, (i + 1/2) step_y)``."""
    rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * step[0] / f).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * step[1] / f).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


# --------------------------------------------------------------------------- colour normalisation
def _overlay_factor(height: int, width: int, tile_size: int) -> int | None:
    """Thumbnail factor for the stats pass (like ``prepare._thumbnail_factor`` with the overlay's
    size limit): the smallest divisor of ``tile_size`` bringing the longest side to at most
    :data:`OVERLAY_MAX_SIDE`; ``None`` when no divisor is large enough."""
    need = max(1, -(-max(height, width) // OVERLAY_MAX_SIDE))
    return next((d for d in range(need, tile_size + 1) if tile_size % d == 0), None)


def _normalizer(slide, record: dict | None, enabled: bool, path: Path):
    """``(TileNormalizer or None, TissueConfig, thumbnail or None, info)`` for one slide, following
    the rule ``prepare`` used for the training data (see the module docstring)."""
    info: dict = {"enabled": False}
    if not record or not record.get("enabled"):
        info["reason"] = "the model's training data were not colour-normalised"
        return None, color.TissueConfig(), None, info
    try:
        tissue_cfg = color.TissueConfig(**record.get("tissue", {}))
        tile_size = int(record["tile_size"])
        mode = record.get("target_mode", "slide")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"model run has a malformed color_norm record ({exc}); retrain it", path) from exc
    if mode not in ("slide", "dataset"):
        raise UserInputError(f"model run has an unknown colour target mode {mode!r}; retrain it", path)
    info.update(target_mode=mode, tile_size=tile_size)
    if not enabled:
        info["reason"] = "turned off (--no-color-norm)"
        return None, tissue_cfg, None, info
    factor = _overlay_factor(slide.height, slide.width, tile_size)
    found = color.compute_slide_tile_stats(slide, tile_size, tissue_cfg, thumbnail_factor=factor)
    tiles, thumb = found if factor is not None else (found, None)
    if mode == "dataset":
        target = color.LabStats.from_dict(record["target"], path) if record.get("target") else None
    else:
        target = color.average_stats(tiles.values()) if tiles else None
    if target is None or not tiles:
        info["reason"] = "no tissue found to measure colour statistics"
        return None, tissue_cfg, thumb, info
    info.update(enabled=True, target=target.to_dict(), tiles_with_tissue=len(tiles))
    return color.TileNormalizer(tiles, target, tile_size, tissue_cfg), tissue_cfg, thumb, info


# --------------------------------------------------------------------------- the model-scale image
def _shrink(region: np.ndarray, scale: _Scale) -> np.ndarray:
    """Box-resize a chunk from slide to model scale, as ``prepare`` resizes ROIs: the chunk is
    zero-padded to whole ROIs first, so every chunk is resized by exactly ``f``."""
    if scale.roi == scale.patch:
        return region
    rows, cols = -(-region.shape[0] // scale.roi), -(-region.shape[1] // scale.roi)
    if (rows * scale.roi, cols * scale.roi) != region.shape[:2]:
        padded = np.zeros((rows * scale.roi, cols * scale.roi, 3), np.uint8)
        padded[: region.shape[0], : region.shape[1]] = region
        region = padded
    size = (cols * scale.patch, rows * scale.patch)
    return np.asarray(Image.fromarray(region).resize(size, Image.Resampling.BOX))


def _model_image(slide, scale: _Scale, normalizer, tissue_cfg, bar) -> tuple[np.ndarray, np.ndarray]:
    """The colour-normalised model-scale image (uint8) and its tissue mask (of the raw colours)."""
    H, W = int(slide.height), int(slide.width)
    Hm, Wm = scale.model_size(H), scale.model_size(W)
    image = np.zeros((Hm, Wm, 3), np.uint8)
    tissue = np.zeros((Hm, Wm), bool)
    C, K = scale.chunk, scale.model_chunk
    for y in range(0, H, C):
        for x in range(0, W, C):
            region = slide.read_region(x, y, min(C, W - x), min(C, H - y))
            ym, xm = (y // C) * K, (x // C) * K
            hm, wm = min(K, Hm - ym), min(K, Wm - xm)
            raw = _shrink(region, scale)[:hm, :wm]
            tissue[ym : ym + hm, xm : xm + wm] = color.tissue_mask(np.ascontiguousarray(raw), tissue_cfg)
            if normalizer is not None:
                raw = _shrink(normalizer.apply(region, x, y), scale)[:hm, :wm]
            image[ym : ym + hm, xm : xm + wm] = raw
            bar.update(1)
    return image, tissue


# --------------------------------------------------------------------------- inference
def _n_windows(rows: int, cols: int, window: int, overlap: float) -> int:
    """Number of windows MONAI's sliding window visits on a ``rows x cols`` image."""
    from monai.data.utils import dense_patch_slices

    size = (max(rows, window), max(cols, window))
    interval = tuple(window if s == window else max(1, int(window * (1 - overlap))) for s in size)
    return len(dense_patch_slices(size, (window, window), interval))


def _bands(height: int, width: int, window: int, num_classes: int) -> tuple[int, int]:
    """``(band_rows, margin)``: rows labelled per band and context rows added above and below."""
    per_row = width * 4 * (3 + 2 * num_classes + 1)  # float32 input, output + buffer, weight map
    rows = max(2 * window, BAND_BYTES // max(per_row, 1))
    return (height, 0) if rows >= height else (rows, window)


def _infer_labels(run: Segmenter, image: np.ndarray, window: int, overlap: float, batch_size: int,
                  progress: bool, desc: str = "segmenting") -> np.ndarray:
    """Band-wise sliding-window inference: arg-max of the Gaussian-blended softmax, uint8."""
    from monai.inferers import sliding_window_inference

    Hm, Wm = image.shape[:2]
    num_classes = int(getattr(run, "num_classes", 3))
    band_rows, margin = _bands(Hm, Wm, window, num_classes)
    spans = []
    for r0 in range(0, Hm, band_rows):
        r1 = min(Hm, r0 + band_rows)
        spans.append((r0, r1, max(0, r0 - margin), min(Hm, r1 + margin)))
    total = sum(_n_windows(b - a, Wm, window, overlap) for _, _, a, b in spans)
    labels = np.empty((Hm, Wm), np.uint8)
    # windows done / total: a bar on a terminal, a line every 30 s with speed and ETA in a log
    with progress_bar(total, desc, unit="window", enabled=progress, leave=False) as bar:

        def predictor(x: torch.Tensor) -> torch.Tensor:
            logits = run.predict(x)
            expected = (x.shape[0], num_classes, x.shape[2], x.shape[3])
            if tuple(logits.shape) != expected:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected {expected}")
            bar.update(x.shape[0])
            return torch.softmax(logits.float(), dim=1)

        with torch.inference_mode():
            for r0, r1, a, b in spans:
                band = to_tensor_image(image[a:b]).unsqueeze(0)
                probs = sliding_window_inference(
                    band, (window, window), batch_size, predictor, overlap=overlap, mode="gaussian",
                    padding_mode="constant", cval=-1.0,  # black, the DCI background
                    sw_device=getattr(run, "device", None), device="cpu",
                )
                labels[r0:r1] = probs[0, :, r0 - a : r1 - a].argmax(0).to(torch.uint8).numpy()
    return labels


# --------------------------------------------------------------------------- outputs
def _areas(labels: np.ndarray, tissue: np.ndarray, scale: _Scale, H: int, W: int,
           num_classes: int) -> dict:
    """Class areas in slide px^2 (each model pixel weighted by the slide area it covers)."""
    rowcov, colcov = scale.coverage(labels.shape[0], H), scale.coverage(labels.shape[1], W)
    total = np.zeros(num_classes)
    in_tissue = np.zeros(num_classes)
    for r0 in range(0, labels.shape[0], 256):
        lab, tis = labels[r0 : r0 + 256], tissue[r0 : r0 + 256]
        weight = rowcov[r0 : r0 + 256, None] * colcov[None, :]
        total += np.bincount(lab.ravel(), weights=weight.ravel(), minlength=num_classes)[:num_classes]
        in_tissue += np.bincount(lab[tis], weights=weight[tis], minlength=num_classes)[:num_classes]
    slide_area, tissue_area = float(H) * float(W), float(in_tissue.sum())
    names = list(CLASS_NAMES) + [str(k) for k in range(len(CLASS_NAMES), num_classes)]
    classes = {
        names[c]: {
            "area_px2": round(float(total[c]), 2),
            "fraction_of_slide": round(float(total[c]) / slide_area, 6),
            "area_in_tissue_px2": round(float(in_tissue[c]), 2),
            "fraction_of_tissue": round(float(in_tissue[c]) / tissue_area, 6) if tissue_area > 0 else None,
        }
        for c in range(num_classes)
    }
    return {"slide_area_px2": slide_area, "tissue_area_px2": round(tissue_area, 2),
            "tissue_fraction": round(tissue_area / slide_area, 6), "classes": classes}


def _geojson(labels: np.ndarray, scale: _Scale, H: int, W: int) -> dict:
    """Lesion polygons in slide pixels, clipped to the slide (the last model pixels may overhang)."""
    collection = mask_to_geojson(labels, scale=scale.f)
    if labels.shape[0] * scale.f > H or labels.shape[1] * scale.f > W:
        kept = []
        for feature in collection["features"]:
            geom = shapely.clip_by_rect(shape(feature["geometry"]), 0, 0, W, H)
            if geom.is_empty or geom.area <= 0:
                continue
            feature["geometry"] = mapping(geom)
            kept.append(feature)
        collection["features"] = kept
    return collection


def _overlay(slide, thumb: np.ndarray | None, labels: np.ndarray, scale: _Scale) -> np.ndarray:
    """Slide thumbnail with benign/malignant pixels tinted by their class colour."""
    from ..data.preview import colour_mask

    if thumb is None:
        thumb = slide.thumbnail(OVERLAY_MAX_SIDE)
    th, tw = thumb.shape[:2]
    small = _sample_labels(labels, scale.f, (slide.height / th, slide.width / tw), (th, tw))
    out = thumb.copy()
    lesion = small > 0
    blend = (1 - OVERLAY_ALPHA) * thumb[lesion] + OVERLAY_ALPHA * colour_mask(small[lesion]).astype(np.float32)
    out[lesion] = np.round(blend).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- entry points
def segment_slide(
    run: Segmenter,
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    window: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
    color_norm: bool = True,
    label_downsample: int = 1,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Path]:
    """Segment one slide into ``out_dir`` (see the module docstring); returns the written files
    under the keys ``labels``, ``overlay``, ``geojson``, ``areas``.

    ``window`` is the sliding-window side in model pixels (default: the run's ``patch_size``; the
    network must accept it), ``overlap`` the fraction shared by neighbouring windows,
    ``batch_size`` the windows per forward pass; ``color_norm=False`` skips the normalisation the
    run's training data had.
    """
    window = _check_settings(run, window, overlap, batch_size, label_downsample)
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError("output is a file, not a folder; choose another --out", out_dir)
    scale = _Scale(run.roi_size, run.patch_size)
    stem = slide_path.stem
    with open_slide(slide_path, max_pixels=max_pixels) as slide:
        H, W = int(slide.height), int(slide.width)
        normalizer, tissue_cfg, thumb, norm_info = _normalizer(
            slide, run.color_norm, color_norm, Path(getattr(run, "run_dir", slide_path))
        )
        n_chunks = math.ceil(H / scale.chunk) * math.ceil(W / scale.chunk)
        with progress_bar(n_chunks, f"reading {stem}", unit="chunk", enabled=progress, leave=False) as bar:
            image, tissue = _model_image(slide, scale, normalizer, tissue_cfg, bar)
        labels = _infer_labels(run, image, window, overlap, batch_size, progress, desc=f"segmenting {stem}")
        del image
        overlay = _overlay(slide, thumb, labels, scale)

    out_dir.mkdir(parents=True, exist_ok=True)
    k = int(label_downsample)
    out_hw = (-(-H // k), -(-W // k))
    paths = output_paths(out_dir, stem)
    write_png_atomic(paths["labels"], _sample_labels(labels, scale.f, (k, k), out_hw))
    write_png_atomic(paths["overlay"], overlay)
    write_geojson(_geojson(labels, scale, H, W), paths["geojson"])
    record = {
        "input": str(slide_path.resolve()),
        "request": _request(run, window, overlap, color_norm, k),
        "height": H,
        "width": W,
        "model_run": str(Path(run.run_dir).resolve()) if getattr(run, "run_dir", None) else None,
        "checkpoint": str(run.checkpoint) if getattr(run, "checkpoint", None) else None,
        "diffusiondci_version": __version__,
        "settings": {
            "window": window, "overlap": float(overlap), "batch_size": int(batch_size),
            "label_downsample": k, "labels_size": list(out_hw),
            "slide_px_per_model_px": scale.f, "model_scale_size": list(labels.shape),
            "patch_size": scale.patch, "roi_size": run.roi_size, "color_norm": norm_info,
        },
        **_areas(labels, tissue, scale, H, W, int(getattr(run, "num_classes", 3))),
    }
    write_json_atomic(paths["areas"], record)  # last: its presence marks the slide as done
    return paths


def _request(run: Segmenter, window: int, overlap: float, color_norm: bool, label_downsample: int) -> dict:
    """What decides a slide's outputs (recorded in ``<stem>_areas.json``; equal requests are skipped)."""
    return {
        "model_run": str(Path(run.run_dir).resolve()) if getattr(run, "run_dir", None) else None,
        "checkpoint": str(run.checkpoint) if getattr(run, "checkpoint", None) else None,
        "window": int(window), "overlap": float(overlap), "color_norm": bool(color_norm),
        "label_downsample": int(label_downsample), "tta": str(getattr(run, "tta", "none")),
    }


def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """The four files ``segment`` writes for slide ``stem``."""
    return {key: out_dir / f"{stem}{suffix}" for key, suffix in
            (("labels", "_labels.png"), ("overlay", "_overlay.png"), ("geojson", ".geojson"), ("areas", "_areas.json"))}


def _finished(path: Path, out_dir: Path, request: dict) -> bool:
    """True when ``out_dir`` holds all four outputs of ``path`` made with the same ``request``."""
    outputs = output_paths(out_dir, path.stem)
    if not all(p.is_file() for p in outputs.values()):
        return False
    try:
        record = json.loads(outputs["areas"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("input") == str(path.resolve()) and record.get("request") == request


def segment_paths(run: Segmenter, inputs: Iterable[str | Path], out_dir: str | Path,
                  log: Callable[[str], None] | None = None, overwrite: bool = False,
                  **kw) -> dict[str, dict[str, Path]]:
    """Segment every image in ``inputs`` (files or folders, see :func:`find_images`) into
    ``out_dir``; ``kw`` are :func:`segment_slide`'s options. Returns ``{stem: written files}``.

    A slide whose outputs are already in ``out_dir``, made from the same file with the same model,
    checkpoint and settings, is skipped (so an interrupted batch resumes), unless ``overwrite``.
    """
    images = find_images(inputs)
    out_dir = Path(out_dir)
    overlap, downsample = kw.get("overlap", 0.25), kw.get("label_downsample", 1)
    window = _check_settings(run, kw.get("window"), overlap, kw.get("batch_size", 8), downsample)
    request = _request(run, window, overlap, kw.get("color_norm", True), downsample)
    results: dict[str, dict[str, Path]] = {}
    for n, path in enumerate(images, start=1):
        if not overwrite and _finished(path, out_dir, request):
            results[path.stem] = output_paths(out_dir, path.stem)
            if log is not None:
                log(f"[{n}/{len(images)}] {path.name}: already segmented with these settings "
                    f"({results[path.stem]['labels']}); --overwrite redoes it")
            continue
        results[path.stem] = segment_slide(run, path, out_dir, **kw)
        if log is not None:
            log(f"[{n}/{len(images)}] {path.name} -> {results[path.stem]['labels']}")
    return results
