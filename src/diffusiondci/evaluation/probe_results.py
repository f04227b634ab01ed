"""The probe folder's result files: ``probe.csv`` rows, their ranking summary, the heat map, resume checks.

``probe.csv`` (:data:`CSV_COLUMNS`) is rewritten atomically after every cell; ``probe.json`` records
the settings (and their hash, :func:`settings_key`) so that a rerun only adds cells computed with
the same settings (:func:`check_resume`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserInputError

CSV_COLUMNS = ("block", "timestep", "miou", "dice", "channels", "resolution")


def read_probe_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``probe.csv`` with typed values (missing file -> [])."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                rows.append({
                    "block": int(r["block"]), "timestep": int(r["timestep"]),
                    "miou": float(r["miou"]), "dice": float(r["dice"]),
                    "channels": int(r["channels"]), "resolution": r["resolution"],
                })
            except (KeyError, TypeError, ValueError) as exc:
                raise UserInputError(f"unreadable probe row {r} ({exc}); delete the file to start over", path) from None
    return rows


def write_probe_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            for r in sorted(rows, key=lambda r: (r["timestep"], r["block"])):
                writer.writerow({k: r[k] for k in CSV_COLUMNS})
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summarize_probe(rows: list[dict[str, Any]], top: int = 3) -> dict[str, Any]:
    """Best cell, top blocks (mean mIoU over their timesteps), top timesteps (mean over blocks) and
    the ``seg:`` snippet they suggest (the top blocks at the best timestep)."""
    if not rows:
        raise ValueError("no probe results")
    finite = [r for r in rows if not math.isnan(r["miou"])] or rows
    best = max(finite, key=lambda r: r["miou"])  # first maximum in CSV order on ties

    def ranking(key: str) -> list[dict[str, Any]]:
        groups: dict[int, list[float]] = {}
        for r in finite:
            groups.setdefault(r[key], []).append(r["miou"])
        means = [{key: k, "mean_miou": float(np.mean(v)), "count": len(v)} for k, v in groups.items()]
        return sorted(means, key=lambda m: (-m["mean_miou"], m[key]))[:top]

    top_blocks, top_timesteps = ranking("block"), ranking("timestep")
    seg = {"blocks": sorted(m["block"] for m in top_blocks), "timesteps": [top_timesteps[0]["timestep"]]}
    return {
        "best": {k: best[k] for k in ("block", "timestep", "miou", "dice", "channels", "resolution")},
        "top_blocks": top_blocks,
        "top_timesteps": top_timesteps,
        "suggested_config": {"seg": seg},
        "suggested_yaml": f"seg:\n  blocks: {seg['blocks']}\n  timesteps: {seg['timesteps']}\n",
    }


def plot_probe_heatmap(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Blocks x timesteps heat map of the mIoU, each cell annotated (paper Fig. 3); NaN = not run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = sorted({r["block"] for r in rows})
    steps = sorted({r["timestep"] for r in rows})
    grid = np.full((len(blocks), len(steps)), np.nan)
    for r in rows:
        grid[blocks.index(r["block"]), steps.index(r["timestep"])] = r["miou"]
    fig = Figure(figsize=(max(6.0, 2.5 + 0.75 * len(steps)), max(3.5, 2.0 + 0.45 * len(blocks))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[~np.isnan(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mIoU")
    ax.set_xticks(range(len(steps)), labels=[str(t) for t in steps])
    ax.set_yticks(range(len(blocks)), labels=[str(b) for b in blocks])
    ax.set_xlabel("timestep")
    ax.set_ylabel("decoder block")
    ax.set_title(title or "pixel-classifier mIoU of DSDM features", fontsize=10)
    mid = (lo + hi) / 2
    for i in range(len(blocks)):
        for j in range(len(steps)):
            v = grid[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > mid else "white")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume(out_dir: Path, key: str, settings: dict[str, Any]) -> None:
    """Refuse to mix cells computed with other settings into this folder's probe.csv."""
    meta_path, csv_path = out_dir / "probe.json", out_dir / "probe.csv"
    if not csv_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    if old.get("settings_key") == key:
        return
    old_settings = old.get("settings") or {}
    diff = [f"{k}: {old_settings.get(k)!r} -> {v!r}" for k, v in settings.items() if old_settings.get(k) != v][:4]
    raise UserInputError(
        "holds a probe with other settings" + (f" ({'; '.join(diff)})" if diff else "")
        + "; choose another --out or delete probe.csv to start over", csv_path,
    )


__all__ = ["CSV_COLUMNS", "check_resume", "plot_probe_heatmap", "read_probe_csv", "settings_key", "summarize_probe",
           "write_probe_csv"]
