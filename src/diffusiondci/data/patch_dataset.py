"""Reading a patch dataset (made by ``prepare`` or ``import-patches``) for training.

Items are dicts: ``image`` float32 ``3 x H x W`` in [-1, 1], ``mask`` int64 ``H x W`` (labels 0/1/2),
``labelled`` (bool), ``index`` (position in this dataset) and ``id``. Patches are validated when first
read (RGB, size, labels) and, for small datasets, kept in memory after the first epoch.

Unlabelled patches (manifest ``labelled`` = 0, label-efficient mode) have no mask file: they are left
out by default (``labelled_only=True``, what supervised consumers need); when they are kept, their
``mask`` is all zeros and is never read from disk, and ``labelled`` says to ignore it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserInputError
from .imageio import read_mask, read_rgb

SPLITS = ("train", "val", "test")


def read_dataset_meta(root: str | Path) -> dict:
    root = Path(root)
    meta_path, manifest = root / "dataset.json", root / "manifest.csv"
    if not meta_path.is_file() or not manifest.is_file():
        raise UserInputError(
            "not a patch dataset (dataset.json and manifest.csv missing); create one with "
            "`diffusiondci prepare` or `diffusiondci import-patches`", root,
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"dataset.json is not valid JSON ({exc.msg})", meta_path) from exc


def read_manifest(root: str | Path) -> list[dict[str, str]]:
    with (Path(root) / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def row_is_labelled(row: dict[str, str]) -> bool:
    """Whether a manifest row has a mask (older manifests without the column are all labelled)."""
    return str(row.get("labelled", "1")).strip() not in ("0", "false", "False")


def to_tensor_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 3`` -> float32 ``3 x H x W`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """float ``3 x H x W`` in [-1, 1] -> uint8 ``H x W x 3``."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


class PatchDataset(Dataset):
    """Patches of the given split(s) of a dataset folder, in manifest order.

    ``labelled_only`` drops rows whose manifest marks them unlabelled (``labelled`` = 0); otherwise
    their items carry ``labelled=False`` and (with ``with_masks``) a zero mask that is never read
    from disk. With ``with_masks=False`` items carry no mask (e.g. for the SimCLR encoder).
    """

    def __init__(
        self,
        root: str | Path,
        splits: Sequence[str] | str | None = ("train",),
        with_masks: bool = True,
        labelled_only: bool = True,
        cache: bool = True,
    ):
        self.root = Path(root)
        self.meta = read_dataset_meta(self.root)
        if isinstance(splits, str):
            splits = (splits,)
        unknown = set(splits or ()) - set(SPLITS)
        if unknown:
            raise UserInputError(f"unknown split(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
        rows = read_manifest(self.root)
        if splits is not None:
            rows = [r for r in rows if r["split"] in splits]
        if labelled_only:
            rows = [r for r in rows if row_is_labelled(r)]
        self.rows = rows
        self._labelled = [row_is_labelled(r) for r in rows]
        self.with_masks = with_masks
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @property
    def labelled(self) -> list[bool]:
        """Per item: True when the patch has a mask (manifest ``labelled`` = 1)."""
        return list(self._labelled)

    @property
    def num_labelled(self) -> int:
        return sum(self._labelled)

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{self.rows[i]['id']}.png"

    def mask_path(self, i: int) -> Path | None:
        """The mask file of item ``i``; None for an unlabelled patch (it has none)."""
        if not self._labelled[i]:
            return None
        return self.root / "masks" / f"{self.rows[i]['id']}.png"

    def __getitem__(self, i: int) -> dict:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rgb = read_rgb(self.image_path(i))
        labelled = self._labelled[i]
        item = {"image": to_tensor_image(rgb), "index": i, "id": self.rows[i]["id"], "labelled": labelled}
        if self.with_masks:
            if labelled:
                mask = read_mask(self.mask_path(i), expected_hw=rgb.shape[:2])
                item["mask"] = torch.from_numpy(mask.astype(np.int64))
            else:  # no mask file exists (and a stray one is not trusted): a placeholder, flagged
                item["mask"] = torch.zeros(rgb.shape[:2], dtype=torch.int64)
        if self._cache is not None:
            self._cache[i] = item
        return item
