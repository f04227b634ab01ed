"""What ``sample`` reads: the masks (a folder of label images or a dataset) and one reference image per mask.

References, in order of precedence: ``references`` = a folder of images (``<mask id>.*`` if present,
else the folder's images in turn, in name order); the paired image when the masks come from a dataset;
otherwise random patches of the model's training split (seeded). Folder references (and those of a
dataset that was not colour-normalised) are mapped with the modified Reinhard transfer to the
colour target recorded in the model run, and resized to the model's patch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.imageio import IMAGE_SUFFIXES, read_mask, read_rgb
from ..data.patch_dataset import PatchDataset, read_dataset_meta
from ..errors import UserInputError
from ..runs.formats import DSDM_META
from ..runs.seeds import derive_seed
from .dsdm_run import DSDMRun

__all__ = ["MaskSource", "pick_references", "read_sources"]


@dataclass
class MaskSource:
    id: str
    mask: np.ndarray  # uint8 H x W
    path: Path
    image_path: Path | None = None  # paired image (dataset input)
    row: dict[str, str] = field(default_factory=dict)


def read_sources(masks: Path, size: int, split: str | None) -> tuple[list[MaskSource], dict | None]:
    """Masks (+ paired images) from a dataset folder or a folder of label images."""
    if (masks / "dataset.json").is_file():
        meta = read_dataset_meta(masks)
        ds = PatchDataset(masks, splits=split, with_masks=True, labelled_only=True, cache=False)
        out = []
        for i in range(len(ds)):
            path = ds.mask_path(i)
            mask = read_mask(path)
            _check_size(mask, size, path)
            out.append(MaskSource(ds.rows[i]["id"], mask, path, image_path=ds.image_path(i), row=ds.rows[i]))
        if not out:
            raise UserInputError(f"no labelled patches{f' in split {split!r}' if split else ''}", masks)
        return out, meta
    if split is not None:
        raise UserInputError("--split needs a dataset folder (with dataset.json) as --masks", masks)
    if not masks.is_dir():
        raise UserInputError("--masks must be a folder of mask images or a dataset folder", masks)
    files = sorted(p for p in masks.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"no mask images ({', '.join(IMAGE_SUFFIXES)}) found", masks)
    out = []
    for p in files:
        mask = read_mask(p)  # validates single channel and labels {0, 1, 2}
        _check_size(mask, size, p)
        out.append(MaskSource(p.stem, mask, p))
    return out, None


def _check_size(mask: np.ndarray, size: int, path: Path) -> None:
    if mask.shape != (size, size):
        raise UserInputError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} but the model generates {size}x{size} patches; "
            f"cut or resize the masks to {size} px (nearest neighbour)", path,
        )


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _colour_normaliser(info: DSDMRun, enabled: bool) -> Callable[[np.ndarray], np.ndarray]:
    norm = info.color_norm or {}
    if not enabled or not norm.get("enabled") or not norm.get("target"):
        return lambda rgb: rgb
    from ..data import color

    target = color.LabStats.from_dict(norm["target"], info.run_dir / DSDM_META)
    tissue = color.TissueConfig(**norm["tissue"]) if isinstance(norm.get("tissue"), dict) else None
    return lambda rgb: color.normalize_image(rgb, target, tissue)


def pick_references(
    sources: list[MaskSource],
    references: Path | None,
    masks_meta: dict | None,
    info: DSDMRun,
    normalize_references: bool,
    seed: int,
) -> tuple[list[Path], list[str], str, Callable[[Path], np.ndarray]]:
    """One reference image per source: its path, its name, the mode used and a loader that returns
    it as the model sees it (uint8 at the model's patch size, colour-normalised where needed).

    ``normalize_references`` maps folder references to the model's colour target; ``seed`` draws
    the random training references."""
    size = info.image_size
    normalise = _colour_normaliser(info, normalize_references)
    if references is not None:
        if not references.is_dir():
            raise UserInputError("--references must be a folder of images", references)
        files = sorted(p for p in references.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", references)
        by_stem = {p.stem: p for p in files}
        chosen, unmatched = [], 0
        for s in sources:  # same name if there is one, else the folder's images in turn
            if s.id in by_stem:
                chosen.append(by_stem[s.id])
            else:
                chosen.append(files[unmatched % len(files)])
                unmatched += 1
        return chosen, [p.name for p in chosen], "folder", lambda p: normalise(_resize_rgb(read_rgb(p), size))
    if masks_meta is not None:
        was_normalised = bool((masks_meta.get("color_norm") or {}).get("enabled"))
        paths: list[Path] = [s.image_path for s in sources if s.image_path is not None]
        paired = normalise if not was_normalised else (lambda rgb: rgb)
        return paths, [s.id for s in sources], "paired", lambda p: paired(_resize_rgb(read_rgb(p), size))
    data_path = info.data.get("path")
    if not data_path or not (Path(data_path) / "dataset.json").is_file():
        raise UserInputError(
            f"the model's training data ({data_path}) is not available for random references; "
            "pass --references DIR", info.run_dir / DSDM_META,
        )
    train = PatchDataset(data_path, splits=("train",), with_masks=False, labelled_only=False, cache=False)
    if len(train) == 0:
        raise UserInputError("the training split is empty; pass --references DIR", data_path)
    rng = np.random.default_rng(derive_seed(seed, 23))
    idx = [int(i) for i in rng.integers(0, len(train), size=len(sources))]
    return ([train.image_path(i) for i in idx], [train.ids[i] for i in idx], "training-random",
            lambda p: _resize_rgb(read_rgb(p), size))
