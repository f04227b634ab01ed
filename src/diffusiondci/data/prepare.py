"""``diffusiondci prepare``: whole slides + annotations -> patch dataset.

Pipeline (paper §IV-B1 and §V-A1), one slide at a time, memory bounded by one ROI:

1. find slides and their annotation (``<stem>_mask.png|tif`` label image or ``<stem>.geojson``);
   unlabelled slides (``--unlabelled DIR``, or slides without annotation with ``--allow-unlabelled``)
   go through every step too, but get no mask: manifest ``labelled`` = 0, no ``masks/<id>.png``;
   then check every option, slide header and annotation file before anything is cut
   (:mod:`.prepare_inputs`);
2. colour statistics of every acquisition tile (tissue pixels only, read tile by tile) and the
   label values of every label image;
3. the normalisation target: each slide's average (``slide``) or the dataset's (``dataset``);
4. sliding-window ROIs -> colour-normalised -> resized patch + nearest-neighbour mask;
5. patient/slide-level split, ``manifest.csv`` and ``dataset.json``.

Steps 2 and 4 run on several threads (:mod:`.parallel`: tiles and ROIs are read, normalised and
resized in parallel, in bounded memory); the results do not depend on the number of threads.

Nothing half-written is left in ``--out``: all work happens in ``<out>.partial/`` and is moved into
place at the end. Per-slide results are recorded there, so an interrupted run resumes where it
stopped (same parameters) without duplicating patches.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import CLASS_NAMES, __version__
from ..errors import UserInputError
from . import color
from .annotations import load_class_map, load_geojson
from .imageio import read_rgb, write_json_atomic, write_png_atomic
from .parallel import default_workers, map_ordered
from .prepare_inputs import SlideJob, check_inputs, plan_jobs
from .slides import open_label_image, open_slide
from .splits import assign_splits, group_composition, split_mix_line
from .tiling import EDGE_MODES, axis_starts, roi_grid

DATASET_FORMAT = 1
MANIFEST_COLUMNS = (
    "id", "slide", "group", "split", "x", "y", "roi_size", "patch_size", "tissue_fraction",
    "frac_background", "frac_benign", "frac_malignant", "labelled",
)
THUMB_MAX_SIDE = 1024
ROI_MEMORY_BUDGET = 320 * 2**20  # bytes of ROIs in flight at once (caps the ROI threads)
MERGE_SPAN = 1.25  # overlapping ROIs are read and normalised together up to this many ROIs a side


@dataclass
class PrepareConfig:
    roi_size: int = 3450
    stride: int = 3450
    edge: str = "shift"
    patch_size: int = 256
    tile_size: int = 1150
    color_norm: bool = True
    norm_target: str = "slide"
    min_tissue: float = 0.05
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    max_pixels: int = 900_000_000
    stratify: bool = False  # pick the group split whose val/test class mix matches the whole (splits.py)

    def __post_init__(self) -> None:
        """Check every option at once, naming the flag (also for values from a preset file)."""
        for name in ("roi_size", "stride", "patch_size", "tile_size", "max_pixels", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
                    value <= 0 and name != "seed"):
                kind = "an integer" if name == "seed" else "a positive integer"
                raise UserInputError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
        if not isinstance(self.stratify, bool):
            raise UserInputError(f"--stratify must be true or false, got {self.stratify!r}")
        if self.edge not in EDGE_MODES:
            raise UserInputError(f"--edge must be one of {', '.join(EDGE_MODES)}, got {self.edge!r}")
        if self.norm_target not in ("slide", "dataset"):
            raise UserInputError(f"--norm-target must be 'slide' or 'dataset', got {self.norm_target!r}")
        for name in ("min_tissue", "val_fraction", "test_fraction"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise UserInputError(f"--{name.replace('_', '-')} must be a number, got {getattr(self, name)!r}")
        if not 0 <= self.min_tissue <= 1:
            raise UserInputError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        val, test = self.val_fraction, self.test_fraction
        if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
            raise UserInputError(
                f"--val-fraction ({val}) and --test-fraction ({test}) must each be in [0, 1) and sum "
                "below 1 (the rest is training data)"
            )


# --------------------------------------------------------------------------- staging / resume
def _params_hash(cfg: PrepareConfig, jobs: list[SlideJob], class_map: dict | None) -> str:
    config = dataclasses.asdict(cfg)
    if not cfg.stratify:
        del config["stratify"]  # datasets prepared before the option existed keep their hash
    payload = {
        "config": config,
        "class_map": class_map,
        "slides": [
            [j.stem, j.path.stat().st_size, j.annotation_kind,
             j.annotation_path.stat().st_size if j.annotation_path is not None else 0, j.group]
            for j in jobs
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_existing_output(out: Path, params_hash: str) -> bool:
    """True when ``out`` already holds this very dataset; error when it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserInputError("is a file, not a folder; choose another --out", out)
    meta = out / "dataset.json"
    if meta.is_file():
        try:
            existing = json.loads(meta.read_text()).get("parameters_hash")
        except (json.JSONDecodeError, AttributeError):
            existing = None
        if existing == params_hash:
            return True
        raise UserInputError(
            "output folder already holds a different dataset; choose another --out or delete it", out
        )
    if any(out.iterdir()):
        raise UserInputError("output folder is not empty and is not a dataset; choose another --out", out)
    return False


def _open_staging(out: Path, params_hash: str) -> Path:
    staging = out.with_name(out.name + ".partial")
    marker = staging / "params_hash.txt"
    if staging.exists() and (not marker.is_file() or marker.read_text().strip() != params_hash):
        shutil.rmtree(staging)  # left by a run with other parameters: not resumable
    for sub in ("images", "masks", "state", "thumbnails"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    marker.write_text(params_hash)
    return staging


def class_fractions(mask: np.ndarray | None) -> dict[str, float | str]:
    """The manifest's ``frac_background``, ``frac_benign``, ``frac_malignant`` of a patch mask
    (empty for an unlabelled patch, ``mask=None``)."""
    if mask is None:
        return {f"frac_{name}": "" for name in CLASS_NAMES}
    fractions = np.bincount(mask.ravel(), minlength=3)[:3] / mask.size
    return {f"frac_{name}": round(float(f), 4) for name, f in zip(CLASS_NAMES, fractions)}


def write_manifest(folder: Path, rows: list[dict], split_of_group: dict[str, str] | None = None,
                   columns: tuple[str, ...] = MANIFEST_COLUMNS) -> dict[str, int]:
    """Write ``manifest.csv`` atomically (rows' splits filled from ``split_of_group`` when given);
    returns the number of patches per split."""
    if split_of_group is not None:
        for row in rows:
            row["split"] = split_of_group[row["group"]]
    tmp = folder / "manifest.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(folder / "manifest.csv")
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- stages
def _resize(array: np.ndarray, size: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def _annotation_reader(job: SlideJob, height: int, width: int, cfg: PrepareConfig, class_map):
    """``(read(x, y) -> patch mask or None, closable)``; unlabelled slides read nothing.
    ``read`` may be called from several threads."""
    if job.annotation_kind == "none":
        return (lambda x, y: None), None
    if job.annotation_kind == "mask":
        labels = open_label_image(job.annotation_path, height, width, max_pixels=cfg.max_pixels)

        def read(x: int, y: int) -> np.ndarray:
            region = labels.read_region(x, y, cfg.roi_size, cfg.roi_size, fill=0)
            return _resize(region, cfg.patch_size, Image.Resampling.NEAREST)

        return read, labels
    annotation = load_geojson(job.annotation_path, class_map)
    lock = threading.Lock()  # GEOS builds a prepared geometry's index lazily: one query at a time

    def read(x: int, y: int) -> np.ndarray:
        with lock:
            return annotation.rasterize(x, y, cfg.roi_size, cfg.roi_size, cfg.patch_size, cfg.patch_size)

    return read, None


def _thumbnail_factor(height: int, width: int, tile_size: int) -> int:
    """Integer downsample for thumbnails: the smallest divisor of ``tile_size`` that brings the
    longest side to at most ``THUMB_MAX_SIDE`` (so thumbnail tiles align with acquisition tiles)."""
    need = max(1, -(-max(height, width) // THUMB_MAX_SIDE))
    return next(d for d in range(min(need, tile_size), tile_size + 1) if tile_size % d == 0)


def _validate_label_image(job: SlideJob, height: int, width: int, cfg: PrepareConfig) -> None:
    """Check the labels of the whole label image, strip by strip (memory bounded), so that a bad
    mask stops the run before any patch is written."""
    labels = open_label_image(job.annotation_path, height, width, max_pixels=cfg.max_pixels)
    strip = max(1, 2**24 // max(width, 1))
    for y in range(0, height, strip):
        labels.read_region(0, y, width, min(strip, height - y))
    labels.close()


def _collect_stats(job: SlideJob, cfg: PrepareConfig, staging: Path, tissue_cfg) -> dict:
    """Per-tile colour statistics of one slide (cached in the staging folder)."""
    path = staging / "state" / f"{job.stem}.stats.json"
    if path.is_file():
        return json.loads(path.read_text())
    with open_slide(job.path, max_pixels=cfg.max_pixels) as slide:
        factor = _thumbnail_factor(slide.height, slide.width, cfg.tile_size)
        tiles, thumb = color.compute_slide_tile_stats(
            slide, cfg.tile_size, tissue_cfg, thumbnail_factor=factor
        )
        write_png_atomic(staging / "state" / f"{job.stem}.thumb.png", thumb, compress_level=1)  # temporary
        if job.annotation_kind == "mask":
            _validate_label_image(job, slide.height, slide.width, cfg)
        record = {
            "thumbnail_factor": factor,
            "height": slide.height,
            "width": slide.width,
            "tiles": [[ty, tx, s.to_dict()] for (ty, tx), s in tiles.items()],
            "average": color.average_stats(tiles.values()).to_dict() if tiles else None,
        }
    write_json_atomic(path, record)
    return record


def _tile_dict(record: dict) -> dict:
    return {(ty, tx): color.LabStats.from_dict(s) for ty, tx, s in record["tiles"]}


def _clusters(starts: list[int], roi: int) -> list[list[int]]:
    """Consecutive window starts whose windows overlap, merged while their union spans at most
    ``MERGE_SPAN`` ROIs (e.g. the last regular window and the ``shift`` window at the border)."""
    out: list[list[int]] = []
    for s in starts:
        if out and s < out[-1][-1] + roi and s + roi - out[-1][0] <= MERGE_SPAN * roi:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _roi_workers(cfg: PrepareConfig) -> int:
    """Threads cutting ROIs: one per CPU, as many as :data:`ROI_MEMORY_BUDGET` allows (a group of
    ROIs in flight holds up to MERGE_SPAN^2 ROIs of pixels, a copy of one and Pillow's 4-byte
    copy for resizing: ~11 bytes a ROI pixel)."""
    return max(1, min(default_workers(), ROI_MEMORY_BUDGET // (11 * cfg.roi_size**2)))


class _RoiCutter:
    """Cuts the ROIs of one slide, a group of overlapping ROIs at a time (:meth:`cut`, called from
    several threads): the group's union is read and colour-normalised once, so pixels shared by
    overlapping windows are not normalised twice (normalisation is pointwise: same result)."""

    def __init__(self, job: SlideJob, cfg: PrepareConfig, staging: Path, slide, normalizer, tissue_cfg,
                 read_mask):
        self.job, self.cfg, self.staging, self.slide = job, cfg, staging, slide
        self.normalizer, self.tissue_cfg, self.read_mask = normalizer, tissue_cfg, read_mask
        self._buffers = threading.local()
        # CPUs left over by the (memory-capped) ROI threads normalise chunks within each ROI
        self.normalize_workers = max(1, default_workers() // _roi_workers(cfg))

    def groups(self) -> list[tuple[list[int], list[int]]]:
        cfg, slide = self.cfg, self.slide
        xs = axis_starts(slide.width, cfg.roi_size, cfg.stride, cfg.edge)
        ys = axis_starts(slide.height, cfg.roi_size, cfg.stride, cfg.edge)
        return [(gx, gy) for gy in _clusters(ys, cfg.roi_size) for gx in _clusters(xs, cfg.roi_size)]

    def _read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The window, read into this thread's reusable buffer (no fresh 36 MB per ROI)."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None or buf.size < h * w * 3:
            buf = self._buffers.buf = np.empty(h * w * 3, np.uint8)
        return self.slide.read_region(x, y, w, h, fill=0, out=buf[: h * w * 3].reshape(h, w, 3))

    def cut(self, group: tuple[list[int], list[int]]) -> list[tuple[int, int, dict | None]]:
        """``(x, y, manifest row or None below --min-tissue)`` for every ROI of the group."""
        cfg, roi, size = self.cfg, self.cfg.roi_size, self.cfg.patch_size
        xs, ys = group
        gx, gy = xs[0], ys[0]
        region = self._read(gx, gy, xs[-1] + roi - gx, ys[-1] + roi - gy)
        crops = {(x, y): region[y - gy : y - gy + roi, x - gx : x - gx + roi] for y in ys for x in xs}
        previews, tissue = {}, {}
        for xy, crop in crops.items():
            previews[xy] = _resize(crop, size, Image.Resampling.BOX)
            tissue[xy] = float(color.tissue_mask(previews[xy], self.tissue_cfg).mean())
        keep = [xy for xy in crops if tissue[xy] >= cfg.min_tissue and tissue[xy] > 0]
        if keep and self.normalizer is not None:
            # normalise the bounding box of the kept ROIs once, in place, then resize each of them
            x0, y0 = min(x for x, _ in keep) - gx, min(y for _, y in keep) - gy
            x1, y1 = max(x for x, _ in keep) - gx + roi, max(y for _, y in keep) - gy + roi
            self.normalizer.apply(region[y0:y1, x0:x1], gx + x0, gy + y0, inplace=True,
                                  workers=self.normalize_workers)
            for xy in keep:
                previews[xy] = _resize(crops[xy], size, Image.Resampling.BOX)
        return [(x, y, self._write(x, y, previews[(x, y)], tissue[(x, y)]) if (x, y) in keep else None)
                for (x, y) in crops]

    def _write(self, x: int, y: int, patch: np.ndarray, tissue: float) -> dict:
        job, cfg = self.job, self.cfg
        mask = self.read_mask(x, y)
        pid = f"{job.stem}_x{x}_y{y}"
        write_png_atomic(self.staging / "images" / f"{pid}.png", patch)
        if mask is not None:
            write_png_atomic(self.staging / "masks" / f"{pid}.png", mask)
        return {
            "id": pid, "slide": job.stem, "group": job.group, "split": "", "x": x, "y": y,
            "roi_size": cfg.roi_size, "patch_size": cfg.patch_size,
            "tissue_fraction": round(tissue, 4), **class_fractions(mask),
            "labelled": int(mask is not None),
        }


def _extract_slide(
    job: SlideJob, cfg: PrepareConfig, staging: Path, stats: dict, target, tissue_cfg, class_map,
    progress: Callable[[int, int], None] | None,
) -> list[dict]:
    done = staging / "state" / f"{job.stem}.rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    normalizer = None
    if cfg.color_norm and target is not None:
        normalizer = color.TileNormalizer(_tile_dict(stats), target, cfg.tile_size)

    def thumbnails() -> None:
        thumb_before = read_rgb(staging / "state" / f"{job.stem}.thumb.png")
        if normalizer is not None:
            tile_px = cfg.tile_size // stats["thumbnail_factor"]
            after = color.TileNormalizer(_tile_dict(stats), target, tile_px).apply(thumb_before, 0, 0)
            color.save_before_after(thumb_before, after, staging / "thumbnails" / f"{job.stem}_colornorm.png")
        else:
            write_png_atomic(staging / "thumbnails" / f"{job.stem}.png", thumb_before, compress_level=1)

    with open_slide(job.path, max_pixels=cfg.max_pixels) as slide:
        read_mask, closer = _annotation_reader(job, slide.height, slide.width, cfg, class_map)
        cutter = _RoiCutter(job, cfg, staging, slide, normalizer, tissue_cfg, read_mask)
        grid = roi_grid(slide.height, slide.width, cfg.roi_size, cfg.stride, cfg.edge)
        found: dict[tuple[int, int], dict | None] = {}
        # the before/after picture (item None) is made by the ROI threads, alongside the ROIs
        work = [None, *cutter.groups()]
        try:
            with _pillow_block_cache(_roi_workers(cfg)):
                for results in map_ordered(lambda g: thumbnails() if g is None else cutter.cut(g), work,
                                           _roi_workers(cfg)):
                    found.update({(x, y): row for x, y, row in results or ()})
                    if progress is not None:
                        progress(len(found), len(grid))
        finally:
            if closer is not None:
                closer.close()
    rows = [found[xy] for xy in grid if found[xy] is not None]  # the grid's row-major order
    write_json_atomic(done, rows)
    return rows


@contextlib.contextmanager
def _pillow_block_cache(workers: int):
    """Let Pillow keep the memory blocks of freed images for reuse while ROIs are resized (a
    3450 px RGB image is 48 MB of 16 MB blocks; allocating them afresh per ROI page-faults)."""
    core = Image.core
    if not hasattr(core, "set_blocks_max"):
        yield
        return
    previous = core.get_blocks_max()
    core.set_blocks_max(max(previous, 4 * workers))
    try:
        yield
    finally:
        core.set_blocks_max(previous)


# --------------------------------------------------------------------------- entry point
def prepare_dataset(
    input_dir: str | Path,
    out: str | Path,
    cfg: PrepareConfig,
    masks_dir: str | Path | None = None,
    groups_csv: str | Path | None = None,
    class_map_file: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Callable[[int, int], None]] | None = None,
    unlabelled_dir: str | Path | None = None,
    allow_unlabelled: bool = False,
) -> Path:
    """Build a patch dataset in ``out``; returns ``out``. See the module docstring.

    ``unlabelled_dir``: a folder of slides without annotation, added as unlabelled; with
    ``allow_unlabelled`` slides of ``input_dir`` that have no annotation are added as unlabelled
    instead of being an error. Every input is checked before anything is written
    (:func:`~diffusiondci.data.prepare_inputs.check_inputs`).
    """
    input_dir, out = Path(input_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError("is a file, not a folder; choose another --out", out)
    masks_dir = Path(masks_dir) if masks_dir is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise UserInputError("--masks is not a folder", masks_dir)
    unlabelled_dir = Path(unlabelled_dir) if unlabelled_dir is not None else None
    if unlabelled_dir is not None and not unlabelled_dir.is_dir():
        raise UserInputError("--unlabelled is not a folder; give the folder of unannotated slides", unlabelled_dir)
    class_map = load_class_map(class_map_file) if class_map_file is not None else None
    jobs = plan_jobs(input_dir, masks_dir, Path(groups_csv) if groups_csv else None, unlabelled_dir,
                     allow_unlabelled)
    check_inputs(jobs, cfg, class_map, input_dir)
    params_hash = _params_hash(cfg, jobs, class_map)
    if check_existing_output(out, params_hash):
        log(f"{out} already holds this dataset (same inputs and parameters); nothing to do")
        return out
    staging = _open_staging(out, params_hash)
    tissue_cfg = color.TissueConfig()

    stats = {}
    for job in jobs:
        stats[job.stem] = _collect_stats(job, cfg, staging, tissue_cfg)
    slide_targets = {
        stem: color.LabStats.from_dict(rec["average"]) if rec["average"] else None
        for stem, rec in stats.items()
    }
    known = [t for t in slide_targets.values() if t is not None]
    if cfg.norm_target == "dataset":
        all_tiles = [s for rec in stats.values() for s in _tile_dict(rec).values()]
        dataset_target = color.average_stats(all_tiles) if all_tiles else None
    else:
        dataset_target = color.average_stats(known) if known else None

    rows: list[dict] = []
    for n, job in enumerate(jobs, start=1):
        target = dataset_target if cfg.norm_target == "dataset" else slide_targets[job.stem]
        tick = progress_factory(f"[{n}/{len(jobs)}] {job.stem}", 0) if progress_factory else None
        rows.extend(_extract_slide(job, cfg, staging, stats[job.stem], target, tissue_cfg, class_map, tick))
    if not rows:
        raise UserInputError(
            "no ROI passed the tissue threshold; lower --min-tissue or check --roi-size", input_dir
        )

    split_of_group = assign_splits([j.group for j in jobs], cfg.val_fraction, cfg.test_fraction, cfg.seed,
                                   composition=group_composition(rows, CLASS_NAMES) if cfg.stratify else None)
    counts = write_manifest(staging, rows, split_of_group)
    log(split_mix_line(rows))
    num_unlabelled = sum(not r["labelled"] for r in rows)
    meta = {
        "format": DATASET_FORMAT,
        "diffusiondci_version": __version__,
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "num_patches": len(rows),
        "num_unlabelled": num_unlabelled,  # patches without a mask (manifest labelled = 0)
        "splits": counts,
        "parameters": dataclasses.asdict(cfg),
        "parameters_hash": params_hash,
        "source": {
            "input": str(input_dir.resolve()),
            "masks": str(masks_dir.resolve()) if masks_dir else None,
            "unlabelled": str(unlabelled_dir.resolve()) if unlabelled_dir else None,
            "groups_csv": str(Path(groups_csv).resolve()) if groups_csv else None,
            "class_map": class_map,
            "slides": [
                {"stem": j.stem, "file": j.path.name,
                 "annotation": j.annotation_path.name if j.annotation_path is not None else None,
                 "labelled": j.labelled, "group": j.group, "split": split_of_group[j.group],
                 "height": stats[j.stem]["height"], "width": stats[j.stem]["width"]}
                for j in jobs
            ],
        },
        "color_norm": {
            "enabled": cfg.color_norm,
            "target_mode": cfg.norm_target,
            "tile_size": cfg.tile_size,
            "tissue": dataclasses.asdict(tissue_cfg),
            # What inference must map to: the dataset target, or (slide mode) each slide's own average;
            # ``target`` is then the mean of the slide averages, kept for reference.
            "target": dataset_target.to_dict() if dataset_target else None,
            "slide_targets": {k: v.to_dict() for k, v in slide_targets.items() if v is not None},
        },
    }
    write_json_atomic(staging / "dataset.json", meta)
    shutil.rmtree(staging / "state")
    (staging / "params_hash.txt").unlink()
    if out.exists():
        out.rmdir()  # verified empty above
    staging.replace(out)
    log(f"wrote {len(rows)} patches from {len(jobs)} slide(s) to {out} "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}"
        f"{f'; {num_unlabelled} unlabelled' if num_unlabelled else ''})")
    return out
