"""The embedded sample: small, seeded, procedurally generated DCI-like whole slides.

Tests and ``diffusiondci demo`` need slides, masks, annotations and patient groups without any
download, so this module draws them (numpy + scipy.ndimage + scikit-image only, no learning):
:func:`generate_slide` puts together one slide and :func:`write_sample` writes a sample to disk;
the drawing itself lives in :mod:`.phantom_layout` (where tissue, lesions and fat lie) and
:mod:`.phantom_render` (their DCI colours and the per-tile acquisition casts).

What is imitated (paper §IV-B1 and §V-A "Dataset"):

* **Colour model.** DCI (dynamic full-field OCT) gives every pixel a colour from its dynamic
  signal, rendered in HSV: *hue* = characteristic frequency of the signal (slow or static
  structures such as stroma and fibres are blue/cyan/green, metabolically active cells are
  yellow/orange/red), *value* = amplitude of the fluctuation, *saturation* = how narrow the
  spectrum is. The phantom builds the three fields and converts them with
  :func:`skimage.color.hsv2rgb`; anything without tissue is black.
* **Tissue.** One irregular tissue piece on a black background, with fat vacuoles (black holes
  with thin membranes) and wavy fibrous stroma (sparse, dim, blue).
* **Benign** regions: lobule/duct-like clusters of round acini whose epithelium forms bright rings
  of cells around dark lumens, in cool colours (green/cyan, a few yellow cells).
* **Malignant** regions: dense, disordered, pleomorphic cells arranged in nests, bright and warm
  (red/orange/yellow).
* **Acquisition tiles.** A DCI slide is a mosaic of separately acquired ROI patches, which shows
  as colour discrepancies and seams between tiles (§IV-B1, the reason for the modified Reinhard
  normalisation). :attr:`PhantomSlide.rgb` has a random per-tile, per-channel gain and offset plus
  a mild per-tile vignette; :attr:`PhantomSlide.clean_rgb` is the same slide without them.

Label convention (``diffusiondci.CLASS_NAMES``): the mask is what a pathologist would annotate in
QuPath. **0 background** is everything outside an annotated lesion, *tissue or not* (the black
background, fat and normal stroma); **1 benign** and **2 malignant** are the annotated regions
(lumens and the loose stroma between acini included, like a hand-drawn outline). Labels always lie
inside the tissue outline. :attr:`PhantomSlide.tissue` says separately where tissue is.

Sample layout written by :func:`write_sample`::

    out_dir/README.txt
    out_dir/slides/<stem>.tif|.png      slides with casts (every third one, the first included,
                                        is a tiled TIFF with 256 px tiles; the others are PNG)
    out_dir/slides/<stem>_mask.png      label image for most slides ...
    out_dir/slides/<stem>.geojson       ... a QuPath-style GeoJSON instead for ``geojson_slides``
    out_dir/slides/groups.csv           slide,group (patient ids; several slides may share one)
    out_dir/clean/<stem>.png            the cast-free slide (for evaluating colour normalisation)
    out_dir/truth/<stem>_mask.png       the ground-truth mask of every slide, GeoJSON ones included

GeoJSON coordinates follow QuPath: x to the right, y down, in pixels, pixel (row r, column c)
covering ``x in [c, c + 1)``, ``y in [r, r + 1)``; so a pixel belongs to a polygon when its
centre ``(c + 0.5, r + 0.5)`` does. The polygons are traced from the mask (marching squares,
:func:`skimage.measure.find_contours`) and describe the same regions to well within 1 % of area.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from .phantom_layout import _dilate, _erode, _fat_vacuoles, _lobules, _malignant_region, _tissue_outline
from .phantom_render import TileCasts, _apply_casts, _render

__all__ = ["PhantomSlide", "SampleInfo", "TileCasts", "generate_slide", "mask_to_geojson", "write_sample"]

#: Tile size of the TIFF slides (the pyramid-free, tiled layout that real DCI exports use).
TIFF_TILE = 256

_MIN_SIDE = 64


@dataclass
class PhantomSlide:
    """One generated slide; see the module docstring for what each class looks like."""

    rgb: np.ndarray        # uint8 H x W x 3, with per-tile colour casts
    clean_rgb: np.ndarray  # uint8 H x W x 3, the same without casts
    mask: np.ndarray       # uint8 H x W, 0 background (incl. normal tissue), 1 benign, 2 malignant
    tissue: np.ndarray     # bool H x W, tissue (lesions included, fat and background excluded)
    casts: TileCasts


@dataclass
class SampleInfo:
    """What :func:`write_sample` wrote; every dict is keyed by slide stem."""

    root: Path
    slides_dir: Path
    stems: list[str]
    slides: dict[str, Path]
    masks: dict[str, Path]     # label images beside the slides (slides without GeoJSON)
    geojson: dict[str, Path]   # GeoJSON annotations (instead of a label image)
    groups_csv: Path
    groups: dict[str, str]
    clean: dict[str, Path]
    truth: dict[str, Path] = field(default_factory=dict)


def generate_slide(
    size: tuple[int, int] = (768, 768),
    tile_size: int = 256,
    seed: int | Sequence[int] = 0,
    cast_strength: float = 1.0,
) -> PhantomSlide:
    """Generate one DCI-like slide with its ground truth (deterministic for ``seed``).

    ``size`` is ``(H, W)`` (at least 64 px a side); ``tile_size`` the acquisition tile whose colour
    cast is drawn independently; ``cast_strength`` scales the casts (0: ``rgb == clean_rgb``).
    ``seed`` is anything :func:`numpy.random.default_rng` accepts (an int or a sequence of ints).
    Both classes are always present: malignant covers 12-35 % and benign 12-25 % of the tissue.
    """
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise UserInputError(f"phantom size must be (height, width), got {size!r}") from None
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise UserInputError(f"phantom size must be at least {_MIN_SIDE} px a side, got {h}x{w}")
    if int(tile_size) < 16:
        raise UserInputError(f"phantom tile_size must be at least 16 px, got {tile_size}")
    if not cast_strength >= 0:
        raise UserInputError(f"phantom cast_strength must be >= 0, got {cast_strength}")
    rng = np.random.default_rng(seed)
    shape = (h, w)
    outline = _tissue_outline(rng, shape)
    malignant = _malignant_region(rng, outline, rng.uniform(0.12, 0.35))
    available = _erode(outline, 3) & ~_dilate(malignant, 14)
    benign, acini = _lobules(rng, available, int(rng.uniform(0.12, 0.25) * outline.sum()))
    if rng.random() < 0.6:  # a benign lobule entrapped in the tumour: a hole in the malignant region
        trapped, trapped_acini = _lobules(rng, _erode(malignant, 10), 1, (24, 36), max_lobules=1)
        malignant &= ~trapped
        benign |= trapped
        acini += trapped_acini
    stroma = outline & ~_dilate(malignant | benign, 10)
    fat = _fat_vacuoles(rng, stroma)
    tissue = outline & ~fat
    mask = np.zeros(shape, np.uint8)
    mask[benign] = 1
    mask[malignant] = 2
    clean = _render(rng, tissue, fat, malignant, benign, acini)
    rgb, casts = _apply_casts(rng, clean, tissue, int(tile_size), float(cast_strength))
    return PhantomSlide(rgb=rgb, clean_rgb=clean, mask=mask, tissue=tissue, casts=casts)


# --------------------------------------------------------------------------------------------------
# annotations


def mask_to_geojson(mask: np.ndarray) -> dict:
    """QuPath-style GeoJSON of ``mask`` (see :func:`diffusiondci.data.annotations.mask_to_geojson`)."""
    from .annotations import mask_to_geojson as export

    return export(mask)


# --------------------------------------------------------------------------------------------------
# the sample on disk

_README = """\
DiffusionDCI embedded sample (generated by diffusiondci.data.phantom, seed {seed})
================================================================================

Synthetic, procedurally generated stand-ins for Dynamic Cell Imaging (dynamic full-field OCT)
whole slides: black background, tissue coloured by cell dynamics (blue/green = slow or static
stroma and fibres, yellow/orange/red = metabolically active cells). They are NOT real data and
carry no diagnostic meaning; they exist so the tests and `diffusiondci demo` run offline.

slides/<stem>.tif|png    {n} slides of {h}x{w} px with per-acquisition-tile colour casts
                         ({tile} px tiles) like the seams of a real DCI mosaic
slides/<stem>_mask.png   label images: 0 background (incl. normal tissue), 1 benign, 2 malignant
slides/<stem>.geojson    QuPath-style annotations (classes "Benign", "Malignant") for: {geo}
slides/groups.csv        slide,group - patient ids for patient-level splits
clean/<stem>.png         the same slides without colour casts (to evaluate colour normalisation)
truth/<stem>_mask.png    ground-truth label image of every slide
"""


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_sample(
    out_dir: str | os.PathLike,
    n_slides: int = 3,
    size: tuple[int, int] = (768, 768),
    tile_size: int = 256,
    seed: int = 0,
    geojson_slides: Sequence[int] = (-1,),
) -> SampleInfo:
    """Write the embedded sample to ``out_dir`` (layout in the module docstring) and describe it.

    Slide ``i`` is ``generate_slide(size, tile_size, seed=(seed, i))``; slide ``i`` is a tiled TIFF
    when ``i % 3 == 0`` and a PNG otherwise. ``geojson_slides`` are slide indices (negative ones
    count from the end) annotated with a GeoJSON instead of a label image. Patients: each slide is
    its own patient for up to three slides, beyond that slides are dealt to ``max(3, n // 2)``
    patients, so patient-level splits always have at least two groups when ``n_slides >= 2``.
    Everything is written to ``<out_dir>.partial`` first and moved into place at the end.
    """
    import tifffile

    out_dir = Path(out_dir)
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise UserInputError(f"n_slides must be a positive integer, got {n_slides!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError("is a file, not a folder; choose another output folder", out_dir)
    geo_idx = set()
    for k in geojson_slides:
        if not -n_slides <= int(k) < n_slides:
            raise UserInputError(f"geojson_slides index {k} is out of range for {n_slides} slides")
        geo_idx.add(int(k) % n_slides)
    n_groups = n_slides if n_slides <= 3 else max(3, n_slides // 2)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    slides_dir, clean_dir, truth_dir = staging / "slides", staging / "clean", staging / "truth"
    for d in (slides_dir, clean_dir, truth_dir):
        d.mkdir(parents=True)

    stems = [f"phantom_{i:03d}" for i in range(n_slides)]
    names: dict[str, str] = {}
    groups: dict[str, str] = {}
    for i, stem in enumerate(stems):
        slide = generate_slide(size, tile_size, seed=(int(seed), i))
        if i % 3 == 0:
            names[stem] = f"{stem}.tif"
            tifffile.imwrite(slides_dir / names[stem], slide.rgb, photometric="rgb",
                             tile=(TIFF_TILE, TIFF_TILE), compression="zlib", metadata=None)
        else:
            names[stem] = f"{stem}.png"
            _write_png(slides_dir / names[stem], slide.rgb)
        if i in geo_idx:
            text = json.dumps(mask_to_geojson(slide.mask), separators=(",", ":"))
            (slides_dir / f"{stem}.geojson").write_text(text)
        else:
            _write_png(slides_dir / f"{stem}_mask.png", slide.mask)
        _write_png(clean_dir / f"{stem}.png", slide.clean_rgb)
        _write_png(truth_dir / f"{stem}_mask.png", slide.mask)
        groups[stem] = f"P{i % n_groups:03d}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide", "group"])
    writer.writerows(groups.items())
    (slides_dir / "groups.csv").write_text(buf.getvalue())
    geo_names = ", ".join(stems[i] for i in sorted(geo_idx)) or "none"
    (staging / "README.txt").write_text(_README.format(seed=seed, n=n_slides, h=size[0], w=size[1],
                                                       tile=tile_size, geo=geo_names))

    # move into place; slides/ last, so its presence means the sample is complete
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("README.txt", "clean", "truth", "slides"):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)

    slides_out = out_dir / "slides"
    return SampleInfo(
        root=out_dir,
        slides_dir=slides_out,
        stems=stems,
        slides={s: slides_out / names[s] for s in stems},
        masks={s: slides_out / f"{s}_mask.png" for i, s in enumerate(stems) if i not in geo_idx},
        geojson={s: slides_out / f"{s}.geojson" for i, s in enumerate(stems) if i in geo_idx},
        groups_csv=slides_out / "groups.csv",
        groups=groups,
        clean={s: out_dir / "clean" / f"{s}.png" for s in stems},
        truth={s: out_dir / "truth" / f"{s}_mask.png" for s in stems},
    )
