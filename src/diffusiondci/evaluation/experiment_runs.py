"""Resumable building blocks of the experiments: every run is a folder that is reused once finished.

A run counts as finished when its final file exists (``metrics.json`` of the training loop, the
embedding cache of the encoder, ``test_metrics.json`` of a segmenter, ``generation.json`` of a
sample folder); an unfinished folder is resumed (training) or redone (sampling, which resumes
batch-wise by itself). So an interrupted experiment picks up where it stopped.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import build, load_section
from ..data.patch_dataset import PatchDataset, read_manifest
from ..data.prepare import class_fractions, write_manifest

__all__ = [
    "augmented_masks",
    "ensure_dsdm",
    "ensure_encoder",
    "ensure_samples",
    "ensure_seg",
    "labelled_view",
    "pseudo_layouts",
    "score_row",
]

Log = Callable[[str], None]


def _finished(run: Path, marker: str) -> bool:
    return (run / marker).is_file()


def ensure_encoder(data: Path, run: Path, preset: str, steps: int | None, seed: int = 0,
                   use_unlabelled: bool = True, log: Log = print) -> Path:
    from ..train.encoder import EncoderConfig, train_encoder

    if not _finished(run, "embeddings.json"):
        log(f"training reference encoder -> {run}")
        overrides: dict[str, Any] = {"steps": steps, "seed": seed}
        if "use_unlabelled" in load_section(preset, "encoder"):
            overrides["use_unlabelled"] = use_unlabelled
        cfg = build(EncoderConfig, load_section(preset, "encoder"), **overrides)
        train_encoder(data, run, cfg, resume=(run / "config.json").is_file(), progress=False)
    return run


def ensure_dsdm(data: Path, run: Path, preset: str, steps: int | None, encoder: Path | None, seed: int = 0,
                log: Log = print, **overrides: Any) -> Path:
    from ..train.dsdm import DSDMConfig, train_dsdm

    if not _finished(run, "metrics.json"):
        log(f"training DSDM -> {run}")
        cfg = build(DSDMConfig, load_section(preset, "dsdm"), steps=steps, seed=seed, sample_every=0, **overrides)
        train_dsdm(data, run, cfg, encoder_run=encoder if cfg.use_reference else None,
                   resume=(run / "config.json").is_file(), progress=False)
    return run


def ensure_samples(dsdm: Path, masks: Path, out: Path, preset: str, steps: int, split: str | None = "train",
                   num_samples: int = 1, guidance: float | None = None, seed: int = 0, references: Path | None = None,
                   log: Log = print, sampler: str = "ddim") -> Path:
    """Sample (or reuse) a synthetic set with ``sampler`` at ``steps``, whatever the preset's
    ``sample.sampler``: experiments pass their ``sample_sampler``; the demo keeps the default DDIM
    (what its figures were measured with)."""
    from ..diffusion.pipeline import GENERATION_MARKER, SampleConfig, sample_to_folder

    # generation.json records the settings when sampling starts; dataset.json appears when it ends
    if not (_finished(out, GENERATION_MARKER) and _finished(out, "dataset.json")):
        log(f"sampling {dsdm.name} -> {out}")
        cfg = build(SampleConfig, load_section(preset, "sample"), sampler=sampler, steps=steps,
                    num_samples=num_samples, guidance=guidance, seed=seed)
        sample_to_folder(dsdm, masks, out, cfg, references=references, split=split if references is None else None,
                         progress=False, log=lambda m: None)
    return out


def ensure_seg(data: Path, run: Path, preset: str, steps: int | None, dsdm: Path | None = None,
               synthetic: Path | None = None, log: Log = print, **overrides: Any) -> dict[str, Any]:
    """Train (or resume, or reuse) a segmenter run; returns its test scores plus ``wall_s``."""
    from ..train.seg_config import SegConfig
    from ..train.segmentation import evaluate_run, train_seg

    marker = run / "test_metrics.json"
    if not marker.is_file():
        log(f"training segmenter -> {run}")
        values = load_section(preset, "seg")
        if steps is not None:
            values.update(steps=steps, epochs=None)
        cfg = build(SegConfig, values, **overrides)
        start = time.perf_counter()
        train_seg(data, run, cfg, dsdm_run=dsdm, synthetic=synthetic, resume=(run / "config.json").is_file(),
                  progress=False, evaluate_test=False)
        scores = evaluate_run(run, data, "test")
        if scores is None:
            from ..errors import UserInputError

            raise UserInputError("the dataset has no labelled test patches to score on; prepare it with "
                                 "--test-fraction > 0", data)
        scores["wall_s"] = round(time.perf_counter() - start, 1)
        marker.write_text(json.dumps(scores, indent=2))
    return json.loads(marker.read_text())


def score_row(scores: dict[str, Any]) -> dict[str, Any]:
    """The numbers a results table keeps from a ``MetricAccumulator.compute()`` dict."""
    row = {k: scores.get(k) for k in ("mean_dice", "mean_iou", "mean_precision", "mean_recall", "accuracy")}
    pooled = scores.get("dataset") or {}  # one confusion matrix over the whole test split
    row["dataset_dice"], row["dataset_iou"] = pooled.get("mean_dice"), pooled.get("mean_iou")
    for i, name in enumerate(("background", "benign", "malignant")):
        per = scores.get("dice_per_class") or [None] * 3
        row[f"dice_{name}"] = per[i] if i < len(per) else None
    row["wall_s"] = scores.get("wall_s")
    return row


def labelled_view(data: Path, out: Path, n: int | None, seed: int, unit: str = "slide") -> tuple[Path, list[str]]:
    """A copy of dataset ``data`` (images/masks linked, not copied) in which only ``n`` training
    slides (``unit`` slide) or patches (``unit`` patch) keep their label, drawn like ``train-seg
    --labelled``; the other training patches are marked unlabelled. Val/test rows are untouched.
    Returns the folder and the labelled patch ids."""
    from ..train.seg_data import choose_labelled, labelled_groups

    train = PatchDataset(data, splits=("train",), with_masks=False, labelled_only=True, cache=False)
    chosen = {train.ids[i] for i in choose_labelled(train.ids, n, seed, labelled_groups(train, unit))}
    if (out / "dataset.json").is_file():
        return out, sorted(chosen)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks"):
        link = out / sub
        if not link.exists():
            link.symlink_to((data / sub).resolve(), target_is_directory=True)
    rows = read_manifest(data)
    for r in rows:
        if r["split"] == "train" and r.get("labelled", "1") not in ("0",) and r["id"] not in chosen:
            r["labelled"] = "0"
    write_manifest(out, rows, None, tuple(rows[0].keys()) if rows else ())
    meta = json.loads((data / "dataset.json").read_text())
    meta["label_budget"] = {"labelled": n, "unit": unit, "labelled_patches": len(chosen), "seed": seed,
                            "source": str(data.resolve())}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out, sorted(chosen)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def augmented_masks(data: Path, ids: list[str], out: Path, count: int | None = None, seed: int = 0) -> Path:
    """A folder of masks made from the masks ``ids`` of dataset ``data`` and their flipped / rotated
    copies (identity, horizontal flip, vertical flip, 90° rotation: ``<id>_t0..3.png``), for
    generating more synthetic pairs from few annotations (label-efficient mode). With ``count``, only
    that many of the ``4 x len(ids)`` masks are written: every mask once before any mask twice, the
    transforms drawn with ``seed``."""
    import numpy as np

    from ..data.imageio import read_mask, write_png_atomic

    if (out / "done").is_file():
        return out
    rng = np.random.default_rng(seed)
    combos = [(pid, k) for k in range(4) for pid in ids]  # all identities first, then all h-flips, ...
    if count is not None and count < len(combos):
        first = [(pid, int(k)) for pid, k in zip(ids, rng.integers(0, 4, size=len(ids)))]
        taken = set(first)
        rest = [c for c in combos if c not in taken]
        rng.shuffle(first)
        extra = [rest[i] for i in rng.permutation(len(rest))]
        combos = (first + extra)[:count]
    out.mkdir(parents=True, exist_ok=True)
    for pid, k in sorted(combos):
        m = read_mask(data / "masks" / f"{pid}.png")
        t = (m, m[:, ::-1], m[::-1, :], np.rot90(m))[k]
        write_png_atomic(out / f"{pid}_t{k}.png", np.ascontiguousarray(t))
    (out / "done").write_text("ok\n")
    return out


def pseudo_layouts(seg_run: Path, data: Path, out: Path, count: int, seed: int = 0, batch_size: int = 16) -> Path:
    """A dataset folder of ``count`` unlabelled training patches of ``data`` (drawn with ``seed``; all
    of them when there are fewer) with the masks that the segmenter run ``seg_run`` predicts for them
    (its own test-time augmentation): layouts for synthetic pairs beyond the annotated masks, each
    with its own real patch as the paired reference. The generator renders an image *from* the mask,
    so a pair stays consistent even where the prediction is wrong for the real patch.

    ``images`` links to ``data``'s images; ``masks`` holds the predictions (``<id>.png``); the
    manifest lists the chosen patches as labelled training patches with their predicted class
    fractions. Finished when ``dataset.json`` exists (written last)."""
    import numpy as np
    import torch

    from ..data.imageio import write_png_atomic
    from ..errors import UserInputError
    from ..segmentation.run import load_segmenter

    if (out / "dataset.json").is_file():
        return out
    train = PatchDataset(data, splits=("train",), with_masks=False, labelled_only=False, cache=False)
    pool = [i for i, lab in enumerate(train.labelled) if not lab]
    if not pool:
        raise UserInputError("pseudo layouts need unlabelled training patches; the train split has none", data)
    if count < 1:
        raise UserInputError(f"pseudo layouts: count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(i) for i in rng.permutation(pool)[:count])
    seg = load_segmenter(seg_run, device="cpu")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if not link.exists():
        link.symlink_to((data / "images").resolve(), target_is_directory=True)
    rows = []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start:start + batch_size]
        images = torch.stack([train[i]["image"] for i in part])
        pred = seg.predict(images).argmax(1).to(torch.uint8).numpy()
        for i, m in zip(part, pred):
            row = train.rows[i]
            write_png_atomic(out / "masks" / f"{row['id']}.png", np.ascontiguousarray(m))
            rows.append({**row, **class_fractions(m), "labelled": "1"})
    write_manifest(out, rows, None, tuple(rows[0].keys()))
    meta = json.loads((data / "dataset.json").read_text())
    meta["pseudo_layouts"] = {"segmenter": str(Path(seg_run).resolve()), "checkpoint": str(seg.checkpoint),
                              "count": len(rows), "seed": seed, "source": str(Path(data).resolve())}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out
