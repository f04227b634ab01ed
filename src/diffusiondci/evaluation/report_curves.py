"""The report's training curves: each ``log.csv`` drawn with matplotlib (Agg canvas, no pyplot state).

One panel of the training losses (log scale when they span more than a factor 30) and, when the
log has ``val_*`` columns, one of the validation scores.
"""

from __future__ import annotations

import base64
import io
import math

from .report_files import Found, Unreadable, number, read_csv
from .report_html import MAX_IMAGES_PER_SECTION, Builder, esc

_NOT_CURVES = {"step", "epoch", "wall_time", "lr", "steps_per_s"}
_NAMES = {"dice": "Dice", "miou": "mIoU", "loss": "loss", "mse": "MSE", "vlb": "VLB"}


def _label(column: str) -> str:
    """A legend label for a log column: ``val_miou`` -> ``mIoU`` (the panel says validation)."""
    name = column[len("val_"):] if column.startswith("val_") else column
    return _NAMES.get(name, name.replace("_", " "))


def _series(rows: list[dict[str, str]], col: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = number(r.get("step")), number(r.get(col))
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def curve_png(fields: list[str], rows: list[dict[str, str]], title: str) -> str | None:
    """Train-loss panel (+ validation panel when ``val_*`` columns exist) as a PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "step" not in fields:
        raise Unreadable("log.csv has no 'step' column")
    train = [c for c in fields if c not in _NOT_CURVES and not c.startswith("val_") and _series(rows, c)[0]]
    val = [c for c in fields if c.startswith("val_") and _series(rows, c)[0]]
    losses = [c for c in train if "loss" in c] or train[:4]
    panels = [(p, cols) for p, cols in (("training", losses), ("validation", val)) if cols]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, cols) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in cols:
            xs, ys = _series(rows, c)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=_label(c))
        every = [y for c in cols for y in _series(rows, c)[1]]
        if name == "training" and every and min(every) > 0 and max(every) / min(every) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _png(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def compared_curves_png(runs: list[tuple[str, list[dict[str, str]]]]) -> str | None:
    """One line per run (``(label, log rows)``): training loss, and validation Dice when logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, col) for title, col in (("training loss", "loss"), ("validation Dice", "val_dice"))
              if any(_series(rows, col)[0] for _, rows in runs)]
    if not panels:
        return None
    fig = Figure(figsize=(5.4 * len(panels), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, col) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, rows in runs:
            xs, ys = _series(rows, col)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def curves_section(b: Builder, found: Found) -> str:
    parts = []
    logs = [p for p in found.logs if p not in b.in_summary]
    for i, p in enumerate(logs):
        if i >= MAX_IMAGES_PER_SECTION:
            parts.append(f'<p class="note">{len(logs) - i} more log(s) not drawn.</p>')
            break
        try:
            fields, rows = read_csv(p)
            uri = curve_png(fields, rows, b.rel(p.parent))
        except Unreadable as exc:
            b.warn(p, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a plotting failure on odd data must not stop the report
            b.warn(p, Unreadable(f"could not draw curves ({type(exc).__name__}: {exc})"))
            continue
        if uri is None:
            continue
        parts.append(f'<figure><img src="{uri}" alt="training curves">'
                     f"<figcaption>{len(rows)} logged rows — <code>{esc(b.rel(p))}</code></figcaption></figure>")
    return "".join(parts)


__all__ = ["compared_curves_png", "curve_png", "curves_section"]
