"""Segmentation metrics (paper §V-A3 and Tables 5-6): Dice (= F1), IoU, precision, recall, accuracy.

Everything is computed from a confusion matrix ``cm`` with **rows = ground truth, columns =
prediction** over the labels 0 background, 1 benign, 2 malignant. For class ``c``::

    TP = cm[c, c]        FP = cm[:, c].sum() - TP        FN = cm[c, :].sum() - TP
    Dice_c = 2 TP / (2 TP + FP + FN)      IoU_c = TP / (TP + FP + FN)
    Precision_c = TP / (TP + FP)          Recall_c = TP / (TP + FN)
    Accuracy = trace(cm) / cm.sum()       (pixel accuracy)

Convention for empty classes (one rule for every per-class score):

* a class **absent from both** prediction and truth has no score: ``NaN`` (``None`` in the JSON
  dicts) and it is left out of the class means -- as MONAI's ``ignore_empty=True`` does for Dice;
* a class present in **either** prediction or truth always gets a number; a ``0/0`` in one
  ratio then counts as 0. So a class in the truth that is never predicted has Dice = IoU =
  recall = 0 *and* precision 0 (torchmetrics' ``zero_division=0``; MONAI would give NaN and
  silently drop the missed class from the mean precision), and a class predicted but absent
  from the truth has Dice = IoU = precision = recall = 0 (every predicted pixel is a false
  positive; MONAI's ``ignore_empty=True`` would give NaN here, ``ignore_empty=False`` gives 0).

Means (``mean_dice`` ...) are ``nanmean`` over classes, background included unless
``include_background=False``. Over a data set, :class:`MetricAccumulator` reports both the
**per-image** average (the default reported number: each image's class-mean, averaged over
images, with the spread across images) and the **dataset**-level scores of the summed confusion
matrix (every pixel weighted equally).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusiondci import CLASS_NAMES, NUM_CLASSES

#: Scores that have one value per class.
PER_CLASS_KEYS = ("dice", "iou", "precision", "recall")


def _as_numpy_labels(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {x.dtype}")
    return x


def confusion_matrix(pred: Any, truth: Any, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Confusion matrix ``(C, C)`` of ``int64`` counts: rows = truth, columns = prediction.

    ``pred`` and ``truth`` are label maps (numpy or torch, any identical shape, e.g. ``H x W``
    or ``N x H x W``) with integer labels in ``[0, num_classes)``; raises ``ValueError`` otherwise.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = _as_numpy_labels(pred, "pred")
    t = _as_numpy_labels(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    for name, a in (("pred", p), ("truth", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            bad = np.unique(a[(a < 0) | (a >= num_classes)])[:5].tolist()
            raise ValueError(f"{name} has labels {bad} outside [0, {num_classes - 1}]")
    idx = t.astype(np.int64).ravel() * num_classes + p.astype(np.int64).ravel()
    counts = np.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0`` and NaN where the class is absent from both maps."""
    out = np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)
    out[~present] = np.nan
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


class SegmentationScores:
    """Per-class and mean scores of one confusion matrix (see the module docstring for the rules).

    Attributes (numpy ``float64`` arrays of length C, NaN for classes absent from both maps):
    ``dice``, ``iou``, ``precision``, ``recall``; ``accuracy`` (float, NaN for an empty matrix).
    """

    def __init__(self, cm: Any, include_background: bool = True):
        cm = np.asarray(cm)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
            raise ValueError(f"confusion matrix must be square C x C, got shape {cm.shape}")
        if (cm < 0).any():
            raise ValueError("confusion matrix has negative counts")
        if not include_background and cm.shape[0] < 2:
            raise ValueError("include_background=False needs at least 2 classes")
        self.cm = cm.astype(np.float64)
        self.include_background = bool(include_background)
        tp = np.diag(self.cm)
        pred_count = self.cm.sum(axis=0)  # TP + FP
        true_count = self.cm.sum(axis=1)  # TP + FN
        present = (pred_count + true_count) > 0
        self.present = present
        self.dice = _ratio(2 * tp, pred_count + true_count, present)
        self.iou = _ratio(tp, pred_count + true_count - tp, present)
        self.precision = _ratio(tp, pred_count, present)
        self.recall = _ratio(tp, true_count, present)
        total = self.cm.sum()
        self.accuracy = float(tp.sum() / total) if total > 0 else math.nan

    @property
    def num_classes(self) -> int:
        return self.cm.shape[0]

    def mean(self, key: str) -> float:
        """``nanmean`` of a per-class score over the classes (background dropped if asked)."""
        values = getattr(self, key)
        return _nanmean(values if self.include_background else values[1:])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: ``<score>_per_class`` lists, ``mean_<score>`` and ``accuracy`` (NaN -> None)."""
        out: dict[str, Any] = {}
        for key in PER_CLASS_KEYS:
            out[f"{key}_per_class"] = [_json_float(v) for v in getattr(self, key)]
        for key in PER_CLASS_KEYS:
            out[f"mean_{key}"] = _json_float(self.mean(key))
        out["accuracy"] = _json_float(self.accuracy)
        out["include_background"] = self.include_background
        return out


def scores_from_confusion(cm: Any, include_background: bool = True) -> dict[str, Any]:
    """Scores of a confusion matrix as a JSON-safe dict.

    Keys: ``dice_per_class``, ``iou_per_class``, ``precision_per_class``, ``recall_per_class``
    (lists, ``None`` for classes absent from both maps), ``mean_dice``, ``mean_iou``,
    ``mean_precision``, ``mean_recall``, ``accuracy``, ``include_background``.
    """
    return SegmentationScores(cm, include_background=include_background).to_dict()


class MetricAccumulator:
    """Accumulates confusion matrices over many images.

    ``update(pred, truth)`` takes one ``H x W`` label map or a batch ``N x ...`` (first axis =
    images when ``ndim >= 3``). ``compute()`` returns the **per-image** scores at the top level
    (the default reported numbers: per-class scores are ``nanmean`` over images; ``mean_*`` and
    ``accuracy`` are each image's value averaged over images, with ``*_std`` their population
    standard deviation) and, under ``"dataset"``, the scores of the summed confusion matrix.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, include_background: bool = True):
        self.num_classes = int(num_classes)
        self.include_background = bool(include_background)
        self.reset()

    def reset(self) -> None:
        self._per_image: list[np.ndarray] = []

    def update(self, pred: Any, truth: Any) -> None:
        p = _as_numpy_labels(pred, "pred")
        t = _as_numpy_labels(truth, "truth")
        if p.shape != t.shape:
            raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
        if p.ndim < 2:
            raise ValueError(f"expected an H x W label map or a batch N x H x W, got shape {p.shape}")
        if p.ndim == 2:
            p, t = p[None], t[None]
        for pi, ti in zip(p, t):
            self._per_image.append(confusion_matrix(pi, ti, self.num_classes))

    @property
    def num_images(self) -> int:
        return len(self._per_image)

    @property
    def confusion(self) -> np.ndarray:
        """Summed confusion matrix over all images (rows = truth, columns = prediction)."""
        if not self._per_image:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return np.sum(self._per_image, axis=0).astype(np.int64)

    def compute(self) -> dict[str, Any]:
        if not self._per_image:
            raise ValueError("no images were added; call update() first")
        scores = [SegmentationScores(cm, self.include_background) for cm in self._per_image]
        out: dict[str, Any] = {"aggregation": "per_image", "num_images": self.num_images}
        for key in PER_CLASS_KEYS:
            stacked = np.stack([getattr(s, key) for s in scores])  # images x classes
            out[f"{key}_per_class"] = [_json_float(_nanmean(col)) for col in stacked.T]
        for key in PER_CLASS_KEYS:
            values = np.array([s.mean(key) for s in scores])
            values = values[~np.isnan(values)]
            out[f"mean_{key}"] = _json_float(values.mean()) if values.size else None
            out[f"mean_{key}_std"] = _json_float(values.std()) if values.size else None
        acc = np.array([s.accuracy for s in scores])
        acc = acc[~np.isnan(acc)]
        out["accuracy"] = _json_float(acc.mean()) if acc.size else None
        out["accuracy_std"] = _json_float(acc.std()) if acc.size else None
        out["include_background"] = self.include_background
        cm = self.confusion
        out["dataset"] = scores_from_confusion(cm, self.include_background)
        out["confusion_matrix"] = cm.tolist()
        return out


def plot_confusion_matrix(
    cm: Any,
    path: str | Path,
    normalize: bool = True,
    class_names: tuple[str, ...] | list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a confusion-matrix heat map (rows = truth, columns = prediction) to ``path``.

    With ``normalize`` each row is divided by its total (so the diagonal is per-class recall;
    empty rows stay 0) and the cells show the fraction above the raw count. Uses matplotlib's
    Agg canvas directly, so the global pyplot backend is not touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(cm, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square C x C, got shape {counts.shape}")
    n = counts.shape[0]
    if class_names is None:
        class_names = CLASS_NAMES if n == len(CLASS_NAMES) else tuple(str(i) for i in range(n))
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n} x {n} matrix")
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    else:
        values = counts

    fig = Figure(figsize=(1.4 * n + 2.0, 1.2 * n + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if normalize else max(values.max(), 1.0)
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            text = f"{values[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            colour = "white" if values[i, j] > 0.6 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
