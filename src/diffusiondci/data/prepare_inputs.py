"""``prepare``'s inputs: find the slides and their annotations, and check all of them up front.

A run over 40 whole slides takes hours, so everything that can be checked without cutting is
checked before the first slide is touched (:func:`check_inputs`): every slide's header (readable,
RGB, pixel limit), every label image's header (single channel, same size as its slide), every
GeoJSON (parsed in full: JSON, geometry, class names), and the geometry of the options against the
slides. A problem stops the run with one line naming the file and nothing written; suspicious but
possible geometry is a warning (:mod:`warnings`, ``UserWarning``) naming the file and the sizes:

* annotations lying mostly outside their slide (an export from another resolution or pyramid
  level: the patches would get empty masks);
* ``--patch-size`` larger than ``--roi-size`` (patches upsampled, no new detail);
* a slide smaller than the ROI (its one patch is mostly black padding, or with ``--edge drop`` it
  gives none); when *every* slide is, the run stops (e.g. the paper preset's 3450 px ROIs on
  GlaS-sized images).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from .annotations import load_geojson
from .imageio import IMAGE_SUFFIXES
from .slides import check_label_image, slide_size
from .splits import read_groups

__all__ = ["MASK_SUFFIXES", "SlideJob", "check_inputs", "find_annotation", "find_slides", "plan_jobs"]

MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass
class SlideJob:
    path: Path
    stem: str
    annotation_kind: str  # "mask" | "geojson" | "none" (unlabelled slide)
    annotation_path: Path | None
    group: str

    @property
    def labelled(self) -> bool:
        return self.annotation_kind != "none"


# --------------------------------------------------------------------------- discovery
def find_slides(input_dir: Path) -> list[Path]:
    if not input_dir.is_dir():
        raise UserInputError("input is not a folder; give the folder that holds the slides", input_dir)
    slides = sorted(
        p for p in input_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask")
    )
    if not slides:
        raise UserInputError(
            f"no slide images found ({', '.join(IMAGE_SUFFIXES)}); check the folder", input_dir
        )
    return slides


def find_annotation(slide: Path, masks_dir: Path | None) -> tuple[str, Path] | None:
    folders = [masks_dir] if masks_dir is not None else []
    folders.append(slide.parent)
    for folder in folders:
        for suffix in MASK_SUFFIXES:
            candidate = folder / f"{slide.stem}_mask{suffix}"
            if candidate.is_file():
                return "mask", candidate
        candidate = folder / f"{slide.stem}.geojson"
        if candidate.is_file():
            return "geojson", candidate
    return None


def plan_jobs(
    input_dir: Path,
    masks_dir: Path | None,
    groups_csv: Path | None,
    unlabelled_dir: Path | None = None,
    allow_unlabelled: bool = False,
) -> list[SlideJob]:
    """One job per slide: those of ``input_dir`` with their annotation (without one: an error, or an
    unlabelled job with ``allow_unlabelled``), then every slide of ``unlabelled_dir`` as unlabelled.
    Unlabelled slides need a groups-CSV row like any other when a CSV is given (their patient's
    split must be known so that a test patient's images never reach training)."""
    groups = read_groups(groups_csv) if groups_csv is not None else {}
    jobs, missing = [], []

    def add(slide: Path, kind: str, annotation: Path | None) -> None:
        if groups_csv is not None and slide.stem not in groups:
            raise UserInputError(f"slide '{slide.stem}' has no row in the groups CSV; add it", groups_csv)
        if any(j.stem == slide.stem for j in jobs):
            raise UserInputError(
                f"two slides named '{slide.stem}' (patch ids would collide); rename one", slide
            )
        jobs.append(SlideJob(slide, slide.stem, kind, annotation, groups.get(slide.stem, slide.stem)))

    for slide in find_slides(input_dir):
        found = find_annotation(slide, masks_dir)
        if found is None:
            if allow_unlabelled:
                add(slide, "none", None)
            else:
                missing.append(slide.name)
            continue
        add(slide, found[0], found[1])
    if unlabelled_dir is not None:
        for slide in find_slides(unlabelled_dir):
            add(slide, "none", None)
    if missing:
        where = f"under {masks_dir} or " if masks_dir else ""
        raise UserInputError(
            f"no annotation for {len(missing)} slide(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); put <stem>_mask.png or <stem>.geojson {where}beside"
            " each slide, or pass --allow-unlabelled to use them without masks",
            input_dir,
        )
    return jobs


# --------------------------------------------------------------------------- up-front checks
def check_inputs(jobs: list[SlideJob], cfg, class_map: dict | None, input_dir: Path) -> dict[str, tuple[int, int]]:
    """Check every slide and annotation file and the ROI geometry before anything is cut (see the
    module docstring); returns ``{stem: (height, width)}``. ``cfg`` is a ``PrepareConfig``."""
    if cfg.patch_size > cfg.roi_size:
        warnings.warn(
            f"--patch-size {cfg.patch_size} is larger than --roi-size {cfg.roi_size}: every ROI is "
            f"upsampled {cfg.patch_size / cfg.roi_size:.2f}x, which adds no detail; use a --patch-size "
            "of at most the --roi-size", UserWarning, stacklevel=2,
        )
    sizes: dict[str, tuple[int, int]] = {}
    for job in jobs:
        height, width = slide_size(job.path, cfg.max_pixels)
        sizes[job.stem] = (height, width)
        if job.annotation_kind == "mask":
            check_label_image(job.annotation_path, height, width, cfg.max_pixels)
        elif job.annotation_kind == "geojson":
            load_geojson(job.annotation_path, class_map).warn_if_outside(height, width)
    _check_roi_fits(jobs, sizes, cfg, input_dir)
    return sizes


def _check_roi_fits(jobs: list[SlideJob], sizes: dict[str, tuple[int, int]], cfg, input_dir: Path) -> None:
    roi = cfg.roi_size
    if all(max(h, w) < roi for h, w in sizes.values()):
        h, w = max(sizes.values(), key=lambda s: s[0] * s[1])
        raise UserInputError(
            f"the ROI ({roi} px, --roi-size) is larger than every slide (the largest is {w}x{h} px, "
            "width x height): each patch would be mostly black padding; use a --roi-size and --stride "
            "of at most the slide size (e.g. --preset tiny for small images)", input_dir,
        )
    for job in jobs:
        h, w = sizes[job.stem]
        if h < roi or w < roi:
            what = ("it gives no patch (--edge drop)" if cfg.edge == "drop"
                    else f"its patches are padded with black up to {roi}x{roi} px")
            warnings.warn(
                f"{job.path}: the slide is {w}x{h} px (width x height), smaller than the ROI "
                f"({roi} px, --roi-size); {what}", UserWarning, stacklevel=3,
            )
