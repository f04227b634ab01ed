"""``diffusiondci evaluate-seg``: score a folder of predicted label images against ground truth.

Pairing (by file stem; ``.png``, ``.tif`` or ``.tiff``):

* predictions are ``<stem>_labels.*`` (what ``diffusiondci segment`` writes); a prediction folder
  with no ``*_labels.*`` file is read as plain ``<stem>.*`` label images instead;
* ground truths are ``<stem>_mask.*`` (the slide-folder convention of ``prepare``); a truth folder
  with no ``*_mask.*`` file is read as plain ``<stem>.*`` (e.g. a dataset's ``masks/``).

Unmatched files: when no pair matches at all, or with ``strict=True`` when any file is unmatched,
a :class:`UserInputError` lists them. Otherwise (the usual case of segmenting only some of the
labelled slides, or unlabelled slides too) the unmatched files are reported as a warning, listed
in ``metrics.json`` under ``unmatched``, and left out of the scores.

Each pair is validated (same size, labels 0/1/2; errors name the file) and added to a
:class:`~diffusiondci.evaluation.metrics.MetricAccumulator`: the reported numbers are per-image
averages of Dice, IoU, precision, recall and pixel accuracy (``dataset`` holds the pooled ones;
see ``metrics.py`` for the empty-class rules). With ``out_dir`` it writes ``metrics.json``,
``per_image.csv``, ``confusion.png`` (row-normalised pooled confusion matrix) and ``cases.png``
(the ``n_cases`` worst and best images by mean Dice: image | truth | prediction).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import CLASS_NAMES
from ..data.imageio import IMAGE_SUFFIXES, read_mask, write_json_atomic
from ..errors import UserInputError
from .metrics import PER_CLASS_KEYS, MetricAccumulator, SegmentationScores, confusion_matrix

__all__ = ["LABEL_SUFFIXES", "evaluate_folder", "pair_files"]

#: File types read as label images.
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
#: Longest side of one panel of ``cases.png``.
CASE_PANEL_SIDE = 384


def _label_files(folder: Path, tag: str, what: str) -> dict[str, Path]:
    """``{stem: path}`` of the label images in ``folder`` (``<stem><tag>.*`` if any, else ``<stem>.*``)."""
    if not folder.is_dir():
        raise UserInputError(f"{what} folder not found; give the folder that holds the label images", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES)
    tagged = [p for p in files if p.stem.endswith(tag)]
    chosen = [(p.stem[: -len(tag)], p) for p in tagged] if tagged else [(p.stem, p) for p in files]
    out: dict[str, Path] = {}
    for stem, path in chosen:
        if stem in out:
            raise UserInputError(f"two {what} files for '{stem}' ({out[stem].name}, {path.name}); keep one",
                                 folder)
        out[stem] = path
    if not out:
        raise UserInputError(f"no {what} label images (<stem>{tag}.png or <stem>.png) found", folder)
    return out


def _listing(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def pair_files(pred_dir: str | Path, truth_dir: str | Path,
               strict: bool = False) -> tuple[list[tuple[str, Path, Path]], dict[str, list[str]]]:
    """``([(stem, prediction, truth), ...], {"predictions": [...], "truths": [...]})``: the pairs
    by stem and the unmatched files' names (see the module docstring for the rules)."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    preds = _label_files(pred_dir, "_labels", "prediction")
    truths = _label_files(truth_dir, "_mask", "ground-truth")
    pairs = [(s, preds[s], truths[s]) for s in sorted(preds.keys() & truths.keys())]
    unmatched = {
        "predictions": [preds[s].name for s in sorted(preds.keys() - truths.keys())],
        "truths": [truths[s].name for s in sorted(truths.keys() - preds.keys())],
    }
    if not pairs:
        raise UserInputError(
            f"no prediction matches a ground truth by stem (predictions: {_listing(sorted(preds))}; "
            f"truths: {_listing(sorted(truths))}); name them <stem>_labels.png and <stem>_mask.png",
            pred_dir,
        )
    if strict and (unmatched["predictions"] or unmatched["truths"]):
        parts = [f"{what} without a {other}: {_listing(unmatched[key])}"
                 for key, what, other in (("truths", "ground truths", "prediction"),
                                          ("predictions", "predictions", "ground truth"))
                 if unmatched[key]]
        raise UserInputError("; ".join(parts) + "; add the missing files or drop --strict", pred_dir)
    return pairs, unmatched


def _read_pair(pred_path: Path, truth_path: Path) -> tuple[np.ndarray, np.ndarray]:
    truth = read_mask(truth_path)
    pred = read_mask(pred_path)
    if pred.shape != truth.shape:
        raise UserInputError(
            f"prediction is {pred.shape[0]}x{pred.shape[1]} (height x width) but its ground truth "
            f"{truth_path.name} is {truth.shape[0]}x{truth.shape[1]}; segment at full size "
            "(--label-downsample 1) or resize the mask", pred_path,
        )
    return pred, truth


def _csv_value(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _row(stem: str, pred_path: Path, truth_path: Path, shape: tuple[int, int],
         scores: SegmentationScores) -> dict:
    row = {"stem": stem, "prediction": pred_path.name, "truth": truth_path.name,
           "height": shape[0], "width": shape[1]}
    for key in PER_CLASS_KEYS:
        row[f"mean_{key}"] = scores.mean(key)
    row["accuracy"] = scores.accuracy
    for key in PER_CLASS_KEYS:
        for name, value in zip(CLASS_NAMES, getattr(scores, key)):
            row[f"{key}_{name}"] = float(value)
    return row


def _write_csv(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) if isinstance(v, float) else v for k, v in row.items()})
    tmp.replace(path)
    return path


def _table(metrics: dict) -> list[str]:
    def fmt(v) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f"{'class':<12}{'Dice':>8}{'IoU':>8}{'Prec.':>8}{'Recall':>8}"]
    for c, name in enumerate(CLASS_NAMES):
        lines.append(f"{name:<12}" + "".join(f"{fmt(metrics[f'{k}_per_class'][c]):>8}" for k in PER_CLASS_KEYS))
    lines.append(f"{'mean':<12}" + "".join(f"{fmt(metrics[f'mean_{k}']):>8}" for k in PER_CLASS_KEYS))
    lines.append(f"pixel accuracy {fmt(metrics['accuracy']).strip()}  "
                 f"(per-image means over {metrics['num_images']} image(s); pooled scores in metrics.json)")
    return lines


def _find_image(images_dir: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (images_dir / f"{stem}{suffix}", images_dir / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _small_mask(mask: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(max(mask.shape) / CASE_PANEL_SIDE))
    return mask[step // 2 :: step, step // 2 :: step]


def _plot_cases(path: Path, cases: list[tuple[str, str, float, Path, Path]], images_dir: Path | None,
                log: Callable[[str], None]) -> Path:
    """One row per case: (image) | ground truth | prediction, in the ``preview`` class colours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data.preview import colour_mask
    from ..data.slides import open_slide

    ncols = 3 if images_dir is not None else 2
    fig = Figure(figsize=(2.6 * ncols, 2.6 * len(cases) + 0.4))
    FigureCanvasAgg(fig)
    for r, (stem, kind, dice, pred_path, truth_path) in enumerate(cases):
        pred, truth = read_mask(pred_path), read_mask(truth_path)
        panels = [("ground truth", colour_mask(_small_mask(truth))),
                  ("prediction", colour_mask(_small_mask(pred)))]
        if images_dir is not None:
            found = _find_image(images_dir, stem)
            if found is None:
                log(f"warning: no image for '{stem}' in {images_dir}")
                panels.insert(0, ("image not found", np.zeros((8, 8, 3), np.uint8)))
            else:
                with open_slide(found) as slide:
                    panels.insert(0, ("image", slide.thumbnail(CASE_PANEL_SIDE)))
        for c, (title, picture) in enumerate(panels):
            ax = fig.add_subplot(len(cases), ncols, r * ncols + c + 1)
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(f"{stem} ({kind}, Dice {dice:.3f})" if c == 0 else title, fontsize=8)
            ax.axis("off")
    fig.text(0.5, 0.005, "blue background, green benign, yellow malignant", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    return path


def evaluate_folder(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    n_cases: int = 4,
    strict: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Score every prediction/ground-truth pair (module docstring); returns what ``metrics.json``
    holds: :meth:`MetricAccumulator.compute`'s dict plus ``class_names``, ``per_image`` rows,
    ``unmatched`` files and the folders. Prints a short table through ``log``."""
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 0:
        raise UserInputError(f"n_cases must be a non-negative integer, got {n_cases!r}")
    images_dir = Path(images_dir) if images_dir is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise UserInputError("--images folder not found", images_dir)
    pairs, unmatched = pair_files(pred_dir, truth_dir, strict=strict)
    for key, what in (("truths", "ground truths without a prediction"),
                      ("predictions", "predictions without a ground truth")):
        if unmatched[key]:
            log(f"warning: {len(unmatched[key])} {what} left out: {_listing(unmatched[key])}")

    acc = MetricAccumulator()
    rows, dice_of = [], []
    for stem, pred_path, truth_path in pairs:
        pred, truth = _read_pair(pred_path, truth_path)
        acc.update(pred, truth)
        scores = SegmentationScores(confusion_matrix(pred, truth))
        rows.append(_row(stem, pred_path, truth_path, pred.shape, scores))
        dice_of.append(scores.mean("dice"))
    metrics = acc.compute()
    metrics.update(
        class_names=list(CLASS_NAMES),
        prediction_dir=str(Path(pred_dir).resolve()),
        truth_dir=str(Path(truth_dir).resolve()),
        unmatched=unmatched,
        per_image=[{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                   for r in rows],
    )
    for line in _table(metrics):
        log(line)

    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserInputError("output is a file, not a folder; choose another --out", out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from .metrics import plot_confusion_matrix

        write_json_atomic(out_dir / "metrics.json", metrics)
        _write_csv(out_dir / "per_image.csv", rows)
        plot_confusion_matrix(acc.confusion, out_dir / "confusion.png",
                              title=f"pooled over {len(pairs)} image(s), rows = truth")
        if n_cases > 0:
            order = sorted(range(len(pairs)), key=lambda i: (np.nan_to_num(dice_of[i], nan=-1.0), pairs[i][0]))
            worst = order[:n_cases]
            best = [i for i in reversed(order) if i not in worst][:n_cases]
            cases = [(pairs[i][0], kind, dice_of[i], pairs[i][1], pairs[i][2])
                     for kind, chosen in (("worst", worst), ("best", best)) for i in chosen]
            _plot_cases(out_dir / "cases.png", cases, images_dir, log)
        log(f"wrote {out_dir / 'metrics.json'}, per_image.csv, confusion.png"
            + (", cases.png" if n_cases > 0 else ""))
    return metrics
