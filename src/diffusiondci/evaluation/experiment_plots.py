"""Plots of experiment summaries (mean with std error bars over seeds), matplotlib Agg only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["bar_plot", "line_plot"]


def _values(rows: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    means = [float(r.get(f"{metric}_mean") or 0.0) for r in rows]
    stds = [float(r.get(f"{metric}_std") or 0.0) for r in rows]
    return means, stds


def bar_plot(summary: list[dict[str, Any]], key: str, metric: str, path: Path, title: str) -> Path:
    """One bar per setting, error bar = std over seeds, value printed on the bar."""
    labels = [str(r[key]) for r in summary]
    means, stds = _values(summary, metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels)), 3.4), dpi=120)
    bars = ax.bar(labels, means, yerr=stds, capsize=4, color="#4c72b0")
    for b, m, sd in zip(bars, means, stds):  # the value above its error bar
        ax.annotate(f"{m:.3f}", (b.get_x() + b.get_width() / 2, m + sd), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel(metric.replace("_", " "))
    n = summary[0].get("n") if summary else None
    ax.set_title(title + (f"\nmean ± std over {n} seeds" if n else ""), fontsize=10)
    if max((len(label) for label in labels), default=0) > 10:  # long names would run into each other
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(summary: list[dict[str, Any]], key: str, metric: str, path: Path, title: str, xlabel: str,
              group: str | None = None) -> Path:
    """``metric`` against ``key`` (one line per ``group`` value), error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in summary:
        groups.setdefault(str(r[group]) if group else metric, []).append(r)
    for name, rows in groups.items():
        xs = [r[key] for r in rows]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        order = sorted(range(len(rows)), key=lambda i: (xs[i] if numeric else _budget_key(xs[i])))
        rows = [rows[i] for i in order]
        means, stds = _values(rows, metric)
        x = [r[key] for r in rows] if numeric else [str(r[key]) for r in rows]
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    if group:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _budget_key(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("inf")  # "all" last
