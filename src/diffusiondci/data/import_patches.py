"""``diffusiondci import-patches``: bring already-cut patches into the dataset layout.

Input: ``DIR/images/<id>.png|tif|jpg`` and ``DIR/masks/<id>.png`` (or ``<id>_mask.png``), e.g. another
tool's export. Every pair is validated (readable RGB image, mask of the same size with labels in
{0, 1, 2}, one patch size for all); nothing is resampled. PNG images are copied byte for byte, other
formats are re-encoded losslessly as PNG. Patches form one group each unless ``--groups`` maps
patch ids to groups (patients), so splits never put one group on both sides.

With ``--allow-unlabelled`` an image without a mask file (or every image, when ``masks/`` is absent)
is imported as unlabelled: manifest ``labelled`` = 0, empty class fractions, no mask written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import CLASS_NAMES, __version__
from ..errors import UserInputError
from .imageio import IMAGE_SUFFIXES, read_mask, read_rgb, write_json_atomic, write_png_atomic
from .prepare import DATASET_FORMAT, check_existing_output, class_fractions, write_manifest
from .splits import assign_splits, group_composition, read_groups, split_mix_line


def _find_mask(masks_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.png", f"{stem}_mask.png", f"{stem}.tif", f"{stem}_mask.tif"):
        if (masks_dir / name).is_file():
            return masks_dir / name
    return None


def import_patches(
    source: str | Path,
    out: str | Path,
    groups_csv: str | Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    log: Callable[[str], None] = print,
    allow_unlabelled: bool = False,
    stratify: bool = False,
) -> Path:
    """Import ``source/images`` (+ ``source/masks``) into the dataset folder ``out``; returns ``out``.
    ``stratify``: choose the group split by class mix (:func:`~diffusiondci.data.splits.assign_splits`)."""
    source, out = Path(source), Path(out)
    images_dir, masks_dir = source / "images", source / "masks"
    if not images_dir.is_dir() or not (masks_dir.is_dir() or allow_unlabelled):
        raise UserInputError("expected sub-folders images/ and masks/ (or pass --allow-unlabelled)", source)
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", images_dir)
    groups = read_groups(groups_csv) if groups_csv is not None else {}

    digest = hashlib.sha256()
    for p in images:
        digest.update(f"{p.name}:{p.stat().st_size};".encode())
    split_key = [groups, val_fraction, test_fraction, seed] + (["stratify"] if stratify else [])
    digest.update(json.dumps(split_key, sort_keys=True).encode())
    mask_of = {p.stem: _find_mask(masks_dir, p.stem) if masks_dir.is_dir() else None for p in images}
    if allow_unlabelled:  # which images are labelled changes the dataset
        digest.update(json.dumps(sorted(k for k, v in mask_of.items() if v is None)).encode())
    params_hash = digest.hexdigest()[:16]
    if check_existing_output(out, params_hash):
        log(f"{out} already holds this import; nothing to do")
        return out
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    (staging / "masks").mkdir()

    rows, size = [], None
    for image_path in images:
        stem = image_path.stem
        mask_path = mask_of[stem]
        if mask_path is None and not allow_unlabelled:
            raise UserInputError(
                f"no mask for this image (expected masks/{stem}.png; or pass --allow-unlabelled)", image_path
            )
        image = read_rgb(image_path)
        if size is None:
            size = image.shape[:2]
        elif image.shape[:2] != size:
            raise UserInputError(
                f"patch size {image.shape[1]}x{image.shape[0]} differs from the first patch's "
                f"{size[1]}x{size[0]}; all patches must have one size", image_path
            )
        mask = read_mask(mask_path, expected_hw=image.shape[:2]) if mask_path is not None else None
        if image_path.suffix.lower() == ".png":
            shutil.copyfile(image_path, staging / "images" / f"{stem}.png")
        else:
            write_png_atomic(staging / "images" / f"{stem}.png", image)
        if mask is not None:
            write_png_atomic(staging / "masks" / f"{stem}.png", mask)
        if groups_csv is not None and stem not in groups:
            raise UserInputError(f"patch '{stem}' has no row in the groups CSV; add it", groups_csv)
        rows.append({
            "id": stem, "slide": stem, "group": groups.get(stem, stem), "split": "", "x": 0, "y": 0,
            "roi_size": image.shape[0], "patch_size": image.shape[0], "tissue_fraction": "",
            **class_fractions(mask),
            "labelled": int(mask is not None),
        })
    split_of = assign_splits([r["group"] for r in rows], val_fraction, test_fraction, seed,
                             composition=group_composition(rows, CLASS_NAMES) if stratify else None)
    counts = write_manifest(staging, rows, split_of)
    log(split_mix_line(rows))
    write_json_atomic(staging / "dataset.json", {
        "format": DATASET_FORMAT,
        "diffusiondci_version": __version__,
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "num_patches": len(rows),
        "num_unlabelled": sum(not r["labelled"] for r in rows),
        "splits": counts,
        "parameters": {"imported": True, "allow_unlabelled": allow_unlabelled, "val_fraction": val_fraction,
                       "test_fraction": test_fraction, "seed": seed, "stratify": stratify},
        "parameters_hash": params_hash,
        "source": {"input": str(source.resolve()),
                   "groups_csv": str(Path(groups_csv).resolve()) if groups_csv else None},
        "color_norm": {"enabled": False, "target_mode": None, "target": None, "slide_targets": {}},
    })
    if out.exists():
        out.rmdir()
    staging.replace(out)
    unlabelled = sum(not r["labelled"] for r in rows)
    log(f"imported {len(rows)} patches to {out} (train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}{f'; {unlabelled} unlabelled' if unlabelled else ''})")
    return out
