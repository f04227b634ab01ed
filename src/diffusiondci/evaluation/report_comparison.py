"""The report's comparison of models: which one segments best, by how much, with what spread.

Two sources, in this order:

1. experiment folders: ``summary.csv`` (``X_mean`` / ``X_std`` over seeds, ``n``) gives one row per
   setting; ``paired.csv`` (or, failing that, ``results.csv`` holding a ``plain_unet`` method and a
   ``seed`` column, paired with :func:`~diffusiondci.evaluation.experiments.paired_gain`) gives the
   gain over the plain U-Net of the same seed;
2. otherwise the segmentation runs of the folder (``config.json`` with ``stage`` ``seg`` and a
   ``test_metrics.json``): runs whose settings differ only by the seed are one method, named from
   their settings (plain U-Net, denoising U-Net, skip / CAA injection, synthetic pairs).

Every name shown to the reader is a plain-language label (:data:`METRIC_LABELS`, :func:`method_label`);
the raw column names and settings stay in the folded sections below the summary.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report_files import Found, Unreadable, number, read_csv, read_json
from .report_html import Builder

#: Metric columns (the part before ``_mean``) and their labels; the first ones found are compared.
METRIC_LABELS = {
    "mean_dice": "Dice", "dice": "Dice", "mean_iou": "mIoU", "miou": "mIoU", "iou": "mIoU",
    "mean_precision": "precision", "mean_recall": "recall", "accuracy": "pixel accuracy",
    "fd_encoder": "FD (encoder features)", "fd_pca": "FD (projected)", "fid": "FID", "kid_encoder": "KID (encoder features)",
    "diversity": "diversity", "miou_generated": "mIoU of generated images",
    "dataset_dice": "dataset Dice", "dataset_iou": "dataset mIoU",
}
#: Segmentation metrics compared when present (per-image means, then the Dice of one confusion matrix
#: pooled over the test set); other tables show their first labelled metrics.
SEG_METRICS = ("Dice", "mIoU", "dataset Dice")
LOWER_IS_BETTER = {"FD (encoder features)", "FD (projected)", "FID", "KID (encoder features)"}
#: Method names written by the experiments and what a reader is told.
METHOD_LABELS = {
    "plain_unet": "plain U-Net",
    "denoising_unet": "denoising U-Net (DSDM weights)",
    "skip": "DSDM features, skip injection",
    "caa": "DSDM features, CAA injection",
    "pixel_classifier": "pixel classifier (ddpm-segmentation)",
    "diffusiondci": "DiffusionDCI (CAA + synthetic pairs)",
    "dci_labelled_only": "DiffusionDCI, DSDM trained on labelled slides",
    "dci_with_unlabelled": "DiffusionDCI, DSDM trained with unlabelled slides",
}
#: Setting columns of the experiments and their labels.
SETTING_LABELS = {"method": "method", "labelled": "labelled slides", "ratio": "synthetic ratio",
                  "variant": "generator", "color_norm": "colour normalisation", "guidance": "guidance"}
BASELINE = "plain_unet"
_NOT_SETTINGS = {"n", "seed", "wall_s"}


@dataclass
class Stat:
    """A mean over seeds, its population standard deviation and the number of seeds."""

    mean: float
    std: float | None = None
    n: int | None = None


@dataclass
class Gain:
    """Paired difference to the baseline run of the same seed: mean, std, seeds above it ("k/n")."""

    mean: float
    std: float | None = None
    wins: str | None = None


@dataclass
class Row:
    setting: list[str]
    values: dict[str, Stat] = field(default_factory=dict)  # metric label -> stat
    gains: dict[str, Gain] = field(default_factory=dict)  # metric label -> gain over the baseline
    n: int | None = None


@dataclass
class Comparison:
    title: str
    source: Path  # the experiment folder or the report root
    headers: list[str]  # labels of the setting columns
    metrics: list[str]  # metric labels, in column order
    rows: list[Row]
    baseline: str | None = None  # label of the baseline of the gains (None: no gains)
    plots: list[Path] = field(default_factory=list)
    runs: list[Path] = field(default_factory=list)  # the run folders behind the rows (source 2)


def method_label(value: str) -> str:
    if value in METHOD_LABELS:
        return METHOD_LABELS[value]
    if value.endswith("_synthetic") and value[: -len("_synthetic")] in METHOD_LABELS:
        return METHOD_LABELS[value[: -len("_synthetic")]] + " + synthetic pairs"
    return value.replace("_", " ")


def _setting_value(column: str, value: str) -> str:
    return method_label(value) if column == "method" else value


def _metric_bases(fields: list[str]) -> dict[str, str]:
    """``{metric label: column base}`` of the labelled ``<base>_mean`` columns, the first base per label."""
    out: dict[str, str] = {}
    for f in fields:
        base = f[: -len("_mean")] if f.endswith("_mean") else None
        if base in METRIC_LABELS and METRIC_LABELS[base] not in out:
            out[METRIC_LABELS[base]] = base
    return out


def _settings_of(fields: list[str]) -> list[str]:
    return [f for f in fields if f not in _NOT_SETTINGS and not f.endswith(("_mean", "_std", "_wins"))
            and f not in METRIC_LABELS and not f.startswith(("dice_", "iou_", "precision_", "recall_"))]


def _chosen(bases: dict[str, str]) -> list[str]:
    seg = [m for m in SEG_METRICS if m in bases]
    return seg if seg else list(bases)[:4]


def _gains_from_results(path: Path, settings: list[str], bases: dict[str, str]) -> list[dict[str, Any]]:
    """Paired gains over ``plain_unet`` computed from ``results.csv`` (when no ``paired.csv`` exists)."""
    from .experiments import paired_gain

    fields, rows = read_csv(path)
    if "method" not in fields or "seed" not in fields or not any(r.get("method") == BASELINE for r in rows):
        return []
    metrics = tuple(b for b in bases.values() if b in fields)
    clean = [{k: (number(v) if k in metrics else v) for k, v in r.items()} for r in rows]
    within = tuple(s for s in settings if s != "method" and s in fields)
    return paired_gain(clean, "method", BASELINE, within=within, metrics=metrics)


def _experiment(b: Builder, exp: Path, found: Found) -> Comparison | None:
    path = exp / "summary.csv"
    if not path.is_file():
        return None
    try:
        fields, rows = read_csv(path)
    except Unreadable:
        return None  # reported in the experiments section
    bases = _metric_bases(fields)
    if not bases or not rows:
        return None
    metrics, settings = _chosen(bases), _settings_of(fields)
    gains: list[dict[str, Any]] = []
    try:
        if (exp / "paired.csv").is_file():
            gains = read_csv(exp / "paired.csv")[1]
        elif (exp / "results.csv").is_file():
            gains = _gains_from_results(exp / "results.csv", settings, {m: bases[m] for m in metrics})
    except (Unreadable, KeyError, ValueError, TypeError):
        gains = []
    out = []
    for r in rows:
        row = Row([_setting_value(s, str(r.get(s, ""))) for s in settings], n=_int(r.get("n")))
        for m in metrics:
            mean = number(r.get(bases[m] + "_mean"))
            if mean is not None:
                row.values[m] = Stat(mean, number(r.get(bases[m] + "_std")), row.n)
        match = [g for g in gains if _same_setting(g, r, settings)]
        for g in match[:1]:
            for m in metrics:
                mean = number(g.get(bases[m] + "_gain_mean"))
                if mean is not None:
                    row.gains[m] = Gain(mean, number(g.get(bases[m] + "_gain_std")), g.get(bases[m] + "_wins"))
        out.append(row)
    title = exp.name
    try:
        info = read_json(exp / "experiment.json") if (exp / "experiment.json").is_file() else {}
        title = str(info.get("name", title)) if isinstance(info, dict) else title
    except Unreadable:
        pass
    has_gain = any(r.gains for r in out)
    return Comparison(f"experiment {title}", exp, [SETTING_LABELS.get(s, s.replace("_", " ")) for s in settings],
                      metrics, out, METHOD_LABELS[BASELINE] if has_gain else None,
                      plots=sorted(p for p in found.pngs if p.parent == exp))


def _same_setting(gain: dict[str, Any], row: dict[str, str], settings: list[str]) -> bool:
    """Whether a paired-gain row is about this summary row (its setting columns all match)."""
    keys = _settings_of(list(gain))
    return bool(keys) and set(keys) <= set(settings) and all(str(gain[k]) == str(row.get(k, "")) for k in keys)


def _int(value: Any) -> int | None:
    v = number(value)
    return int(v) if v is not None else None


# --------------------------------------------------------------------------------------------
# segmentation runs of the folder
# --------------------------------------------------------------------------------------------

#: Settings that do not make a different method (the seed repeats a method; paths and budgets of
#: logging or workers change nothing).
_PER_SEED = {"seed", "label_seed", "feature_seed", "log_every", "ckpt_every", "val_every", "num_workers"}


def seg_method_label(config: dict[str, Any]) -> str:
    """A plain-language name of a ``train-seg`` run from its ``config.json``."""
    injection, init = config.get("injection"), config.get("init")
    synthetic = bool(config.get("synthetic")) and (number(config.get("synthetic_ratio")) or 0) > 0
    if injection == "caa":
        name = "DiffusionDCI (CAA" + (" + synthetic pairs)" if synthetic else ")")
    elif injection == "skip":
        name = "DSDM features, skip injection" + (" + synthetic pairs" if synthetic else "")
    elif init == "dsdm":
        name = "denoising U-Net (DSDM weights)" + (" + synthetic pairs" if synthetic else "")
    else:
        name = "plain U-Net" + (" + synthetic pairs" if synthetic else "")
    if config.get("labelled") is not None:
        name += f", {config['labelled']} labelled {config.get('label_unit') or 'slide'}s"
    return name


def _seg_runs(b: Builder, found: Found) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    out = []
    for run in found.runs:
        scores_path = run / "test_metrics.json"
        if not scores_path.is_file():
            continue
        try:
            config, scores = read_json(run / "config.json"), read_json(scores_path)
        except Unreadable as exc:
            b.warn(scores_path, exc)
            continue
        if isinstance(config, dict) and isinstance(scores, dict) and config.get("stage") == "seg":
            out.append((run, config, scores))
    return out


def _runs(b: Builder, found: Found) -> Comparison | None:
    runs = _seg_runs(b, found)
    if not runs:
        return None
    groups: dict[str, list[tuple[Path, dict[str, Any], dict[str, Any]]]] = {}
    for run, config, scores in runs:
        key = json.dumps({k: v for k, v in config.items() if k not in _PER_SEED}, sort_keys=True, default=str)
        groups.setdefault(key, []).append((run, config, scores))
    labels: dict[str, str] = {}
    for key, members in groups.items():
        label = seg_method_label(members[0][1])
        if label in labels.values():  # same name, other settings: tell them apart by folder
            label += f" ({b.rel(members[0][0])})"
        labels[key] = label
    metrics = [m for m, k in (("Dice", "mean_dice"), ("mIoU", "mean_iou"))
               if any(number(s.get(k)) is not None for _, _, s in runs)]
    table_rows, pairs = [], []
    for key, members in groups.items():
        row = Row([labels[key]], n=len(members))
        for m, k in (("Dice", "mean_dice"), ("mIoU", "mean_iou")):
            vals = [v for v in (number(s.get(k)) for _, _, s in members) if v is not None]
            if vals:
                row.values[m] = Stat(statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else None,
                                     len(vals))
        table_rows.append(row)
        for _, config, scores in members:
            pairs.append({"method": labels[key], "seed": config.get("seed"), "data": config.get("data"),
                          "labelled": config.get("labelled"), "label_seed": config.get("label_seed"),
                          "mean_dice": number(scores.get("mean_dice")), "mean_iou": number(scores.get("mean_iou"))})
    baseline = next((labels[k] for k, ms in groups.items() if seg_method_label(ms[0][1]) == "plain U-Net"), None)
    if baseline is not None:
        from .experiments import paired_gain

        for g in paired_gain(pairs, "method", baseline, within=("data", "labelled", "label_seed")):
            row = next(r for r in table_rows if r.setting[0] == g["method"])
            for m, k in (("Dice", "mean_dice"), ("mIoU", "mean_iou")):
                if g.get(f"{k}_gain_mean") is not None and m not in row.gains:
                    row.gains[m] = Gain(g[f"{k}_gain_mean"], g[f"{k}_gain_std"] if g["n"] > 1 else None,
                                        g[f"{k}_wins"])
    has_gain = any(r.gains for r in table_rows)
    return Comparison("segmentation runs in this folder (test patches)", b.root, ["method"], metrics, table_rows,
                      baseline if has_gain else None, runs=[r for r, _, _ in runs])


def comparisons(b: Builder, found: Found) -> list[Comparison]:
    """The experiments' comparisons, or else the one of the folder's segmentation runs."""
    out = [c for c in (_experiment(b, exp, found) for exp in found.experiments) if c is not None]
    if not out:
        runs = _runs(b, found)
        out = [runs] if runs is not None else []
    return out


def best_row(comp: Comparison) -> Row | None:
    """The row with the best first metric (highest, or lowest for distances such as FD)."""
    if not comp.metrics:
        return None
    m = comp.metrics[0]
    scored = [r for r in comp.rows if m in r.values]
    if not scored:
        return None
    sign = -1 if m in LOWER_IS_BETTER else 1
    return max(scored, key=lambda r: sign * r.values[m].mean)


__all__ = ["Comparison", "Gain", "Row", "Stat", "best_row", "comparisons", "method_label", "seg_method_label"]
