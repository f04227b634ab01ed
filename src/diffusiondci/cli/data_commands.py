"""The commands that make a patch dataset: ``prepare`` (from whole slides) and ``import-patches``
(from already-cut patches)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import build, load_section
from .common import PresetOpt, _progress_factory, app


@app.command()
def prepare(
    input_dir: Annotated[Path, typer.Argument(help="Folder of whole-slide images (TIFF, PNG, JPEG).")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    preset: PresetOpt = "paper",
    masks: Annotated[Optional[Path], typer.Option(help="Folder with <stem>_mask.png|.tif|.tiff or <stem>.geojson.")] = None,
    groups: Annotated[Optional[Path], typer.Option(help="CSV: slide stem, group id (e.g. patient).")] = None,
    class_map: Annotated[Optional[Path], typer.Option("--class-map", help="YAML/JSON: GeoJSON class name -> 0/1/2.")] = None,
    roi_size: Annotated[Optional[int], typer.Option(help="ROI side in slide pixels (paper 3450).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window step in pixels (paper 3450).")] = None,
    edge: Annotated[Optional[str], typer.Option(help="Border windows: drop | shift | pad.")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="ROIs are resized to this side (paper 256).")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="Acquisition tile side for colour normalisation.")] = None,
    no_color_norm: Annotated[bool, typer.Option("--no-color-norm", help="Turn colour normalisation off.")] = False,
    norm_target: Annotated[Optional[str], typer.Option(help="Normalise tiles to the slide's or the dataset's average: slide | dataset.")] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="Skip ROIs with a smaller tissue fraction.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of groups for validation.")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Fraction of groups for testing.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split.")] = None,
    stratify: Annotated[Optional[bool], typer.Option("--stratify/--no-stratify", help="Choose, among many seeded group splits, the one whose validation and test class mix and size are closest to the whole (few patients: keeps every class in validation).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images with more pixels (decompression bombs).")] = None,
    unlabelled: Annotated[Optional[Path], typer.Option("--unlabelled", help="Folder of slides without annotation: cut and normalised like the others, no masks (manifest labelled=0).")] = None,
    allow_unlabelled: Annotated[bool, typer.Option("--allow-unlabelled", help="Use slides without an annotation as unlabelled instead of stopping.")] = False,
) -> None:
    """Cut colour-normalised ROI patches and masks from whole slides into a dataset folder."""
    from ..data.prepare import PrepareConfig, prepare_dataset

    cfg = build(
        PrepareConfig, load_section(preset, "prepare"),
        roi_size=roi_size, stride=stride, edge=edge, patch_size=patch_size, tile_size=tile_size,
        color_norm=False if no_color_norm else None, norm_target=norm_target, min_tissue=min_tissue,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, max_pixels=max_pixels,
        stratify=stratify,
    )
    prepare_dataset(input_dir, out, cfg, masks_dir=masks, groups_csv=groups, class_map_file=class_map,
                    log=typer.echo, progress_factory=_progress_factory, unlabelled_dir=unlabelled,
                    allow_unlabelled=allow_unlabelled)


@app.command("import-patches")
def import_patches_cmd(
    source: Annotated[Path, typer.Argument(help="Folder with images/ and masks/ of already-cut patches.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    groups: Annotated[Optional[Path], typer.Option(help="CSV: patch id, group id (e.g. patient).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of groups for validation.")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Fraction of groups for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    stratify: Annotated[bool, typer.Option("--stratify", help="Choose the group split whose validation and test class mix and size are closest to the whole.")] = False,
    allow_unlabelled: Annotated[bool, typer.Option("--allow-unlabelled", help="Import images without a mask file as unlabelled (manifest labelled=0).")] = False,
) -> None:
    """Validate already-cut patches and import them into the dataset layout (no resampling)."""
    from ..data.import_patches import import_patches

    import_patches(source, out, groups_csv=groups, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, log=typer.echo, allow_unlabelled=allow_unlabelled,
                   stratify=stratify)
