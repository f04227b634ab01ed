"""The training data of ``diffusiondci train-seg``: which real images keep their labels, which
synthetic pairs join them, and what ``segmenter.json`` records of the dataset.

* ``synthetic``: a folder written by ``diffusiondci sample``; ``synthetic_ratio`` R adds
  ``round(R x real training images)`` of its pairs (drawn with ``seed``); ``filter_threshold`` keeps
  only pairs on which a segmenter trained on real data (``filter_model``) reaches that mean Dice
  against the conditioning mask (the paper's clinicians, automated); kept / dropped counts go to
  ``synthetic.json``. Validation and test use real images only.
* ``labelled`` N / ``label_seed``: keep the labels of only N annotated training images (drawn
  reproducibly from the train split, which is disjoint by patient / slide from val and test) to
  simulate a small annotation budget. ``label_unit`` says what one of the N is: ``slide`` (default:
  a source slide / image and every patch cut from it, what a pathologist annotates) or ``patch``.
  Unlabelled patches never enter the supervised loss (``labelled_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.patch_dataset import PatchDataset
from ..errors import UserInputError
from ..evaluation.metrics import MetricAccumulator
from ..models.unet import NUM_MASK_CLASSES
from ..runs.seeds import derive_seed
from ..segmentation.run import load_segmenter


def choose_labelled(ids: list[str], n: int | None, seed: int, groups: list[str] | None = None) -> list[int]:
    """Indices of the items of ``ids`` that keep their label: ``n`` of them drawn with ``seed``, or,
    when ``groups`` (one group per item, e.g. its source slide) is given, every item of ``n`` drawn
    groups. All when ``n`` is None.

    The draw depends only on the sorted ids (groups) and the seed, so the same dataset and seed always
    give the same set, whatever the manifest order.
    """
    if n is None:
        return list(range(len(ids)))
    if groups is not None:
        names = sorted(set(groups))
        if n > len(names):
            raise UserInputError(
                f"--labelled {n} asks for more labelled training slides than the {len(names)} there are")
        rng = np.random.default_rng(derive_seed(seed, 11))
        picked = {names[int(i)] for i in rng.choice(len(names), size=n, replace=False)}
        return [i for i, g in enumerate(groups) if g in picked]
    if n > len(ids):
        raise UserInputError(f"--labelled {n} asks for more labelled training images than the {len(ids)} there are")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    rng = np.random.default_rng(derive_seed(seed, 11))
    picked = rng.choice(len(order), size=n, replace=False)
    return sorted(order[int(i)] for i in picked)


def labelled_groups(dataset: PatchDataset, unit: str) -> list[str] | None:
    """The group of every item for :func:`choose_labelled` under ``label_unit`` ``unit``."""
    if unit == "patch":
        return None
    return [r.get("slide") or r["id"] for r in dataset.rows]


def synthetic_subset(
    synthetic: PatchDataset, n_real: int, ratio: float, seed: int, keep: list[int] | None = None
) -> list[int]:
    """Indices of ``round(ratio * n_real)`` synthetic pairs (from ``keep`` if filtered), seeded."""
    pool = list(range(len(synthetic))) if keep is None else list(keep)
    want = int(round(ratio * n_real))
    if want > len(pool):
        raise UserInputError(
            f"--synthetic-ratio {ratio} needs {want} synthetic pairs ({ratio} x {n_real} real images) but "
            f"only {len(pool)} are available{' after filtering' if keep is not None else ''}; "
            "sample more with `diffusiondci sample --num-samples K` or lower the ratio",
            synthetic.root,
        )
    rng = np.random.default_rng(derive_seed(seed, 13))
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=want, replace=False))


class Pairs(Dataset):
    """Image + mask items with a common layout (``image``, ``mask``, ``synthetic``)."""

    def __init__(self, base: Dataset, synthetic: bool):
        self.base, self.synthetic = base, synthetic

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        return {"image": item["image"], "mask": item["mask"], "synthetic": self.synthetic}


def filter_synthetic(
    synthetic: PatchDataset, filter_model: Path, threshold: float, device: torch.device
) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices of the pairs of ``synthetic`` on which the segmenter run ``filter_model`` reaches mean
    Dice ``threshold`` against their mask, and one row per pair (id, mean Dice, kept)."""
    run = load_segmenter(filter_model, device=device)
    kept: list[int] = []
    rows: list[dict[str, Any]] = []
    for start in range(0, len(synthetic), 16):
        idx = list(range(start, min(len(synthetic), start + 16)))
        items = [synthetic[i] for i in idx]
        pred = run.predict(torch.stack([it["image"] for it in items]).to(device)).argmax(1).cpu()
        for i, it, p in zip(idx, items, pred):
            acc = MetricAccumulator(NUM_MASK_CLASSES)
            acc.update(p.numpy(), it["mask"].numpy())
            dice = acc.compute()["mean_dice"]
            ok = dice is not None and dice >= threshold
            rows.append({"id": it["id"], "mean_dice": dice, "kept": bool(ok)})
            if ok:
                kept.append(i)
    return kept, rows


def data_record(dataset: PatchDataset, image_size: int) -> dict[str, Any]:
    """The ``data`` section of ``segmenter.json``: where the training data came from and how it was
    cut and colour-normalised (``segment`` prepares a new slide the same way)."""
    meta = dataset.meta
    params = meta.get("parameters") or {}
    return {
        "path": str(dataset.root.resolve()),
        "patch_size": image_size,
        # slide pixels per patch side: ``segment`` reads windows of this size (None: patches were imported 1:1)
        "roi_size": params.get("roi_size"),
        "classes": meta.get("classes"),
        # the colour target of the training data: ``segment`` maps new slides to it
        "color_norm": meta.get("color_norm"),
    }
