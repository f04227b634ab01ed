"""HTML building blocks of the report: escaping, number format, tables, folds, embedded figures.

:class:`Builder` collects the page's sections and warnings and remembers which pictures were shown,
so that the catch-all "Other figures" section does not repeat them. All text is HTML-escaped
(:func:`esc`); numbers are shown to 4 significant digits (:func:`fmt`).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .report_files import Unreadable, number, png_data_uri

#: Narrower pictures are shown enlarged (by an integer factor up to 4).
MIN_SHOWN_WIDTH = 400
#: Pictures per section (and per list of runs); the rest are named in a note.
MAX_IMAGES_PER_SECTION = 24
#: Rows of a table before it is cut (raw CSV tables).
MAX_TABLE_ROWS = 500

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1150px;
padding:24px;color:#1d2433;background:#fff;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #3b6ea5;padding-bottom:4px;margin-top:2em;
color:#23466f}h3{margin-bottom:.3em;color:#23466f}
p.explain{color:#4a5568;margin-top:.2em}p.meta{color:#4a5568}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #cbd5e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#edf2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{background:#c6f6d5;font-weight:bold}
figure{margin:.6em 0 1.4em}figure img{max-width:100%;height:auto;border:1px solid #e2e8f0}
figcaption{font-size:.85em;color:#4a5568}code{background:#f7fafc;padding:0 3px}
details{margin:.4em 0 1em}summary{cursor:pointer;color:#23466f}
nav ul{columns:2}ul.warn li{color:#9b2c2c}.note{color:#718096;font-style:italic}
p.answer{font-size:1.12em;background:#f0fff4;border-left:4px solid #38a169;padding:8px 12px}
table.summary tr.best td{background:#c6f6d5;font-weight:bold}h4{margin:1.2em 0 .3em;color:#23466f}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}.pair figure{margin:0}
section#summary{border:1px solid #cbd5e0;border-radius:6px;padding:4px 18px 12px;margin-top:1em}
section#summary h2{margin-top:.5em}
"""


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, integers as they are, None as a dash."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, str):
        v = number(value)
        if (v is not None and re.fullmatch(r"\s*[-+]?[\d.]+(e[-+]?\d+)?\s*", value, re.IGNORECASE)
                and not re.match(r"\s*0\d", value)):  # keep zero-padded ids as written
            return fmt(int(v) if re.fullmatch(r"\s*[-+]?\d+\s*", value) else v)
        return value
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(text: Any) -> str:
    """HTML-escaped text without control characters (a damaged file may hold NUL bytes)."""
    return html.escape(_CONTROL.sub("\ufffd", str(text)), quote=True)


def cell(value: Any, tag: str = "td", css: str = "") -> str:
    text = fmt(value)
    cls = ["num"] if tag == "td" and number(value) is not None else []
    cls += [css] if css else []
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<{tag}{attr}>{esc(text)}</{tag}>"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], limit: int | None = None) -> str:
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in shown:
        out.append("<tr>" + "".join(cell(v) for v in r) + "</tr>")
    out.append("</tbody></table>")
    if len(shown) < len(rows):
        out.append(f'<p class="note">first {len(shown)} of {len(rows)} rows shown</p>')
    return "".join(out)


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def csv_table(fields: list[str], rows: list[dict[str, str]]) -> str:
    return table(fields, ([r.get(f, "") for f in fields] for r in rows), limit=MAX_TABLE_ROWS)


class Builder:
    """Accumulates sections, warnings and the set of PNGs already shown."""

    def __init__(self, root: Path):
        self.root = root
        self.sections: list[tuple[str, str, str]] = []  # (id, heading, html)
        self.warnings: list[str] = []
        self.shown: set[Path] = set()
        self.in_summary: set[Path] = set()  # pictures the summary shows; the sections below skip them

    def rel(self, path: Path) -> str:
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
        return rel if rel != "." else f"{self.root.name}/ (the folder itself)"

    def warn(self, path: Path, exc: Exception) -> None:
        self.warnings.append(f"{self.rel(path)}: {exc}")

    def figure(self, path: Path, caption: str | None = None) -> str:
        """An embedded picture (or "" with a warning when it cannot be read)."""
        self.shown.add(path)
        try:
            uri, is_mask, width = png_data_uri(path)
        except (Unreadable, OSError) as exc:
            self.warn(path, exc)
            return ""
        if is_mask:
            legend = "label mask: blue background, green benign, yellow malignant"
            caption = f"{caption}; {legend}" if caption else legend
        cap = esc(caption) + " — " if caption else ""
        # small pictures (64 px patches) are enlarged with sharp pixels so that they can be seen
        zoom = min(4, MIN_SHOWN_WIDTH // max(width, 1))
        style = f' style="width:{zoom * width}px;image-rendering:pixelated"' if zoom > 1 else ""
        return (f'<figure><img src="{uri}" alt="{esc(path.name)}"{style}>'
                f"<figcaption>{cap}<code>{esc(self.rel(path))}</code></figcaption></figure>")

    def figures(self, paths: Sequence[Path], caption: str | None = None, budget: list[int] | None = None) -> str:
        """Several pictures sharing one section's cap (``budget`` is a one-item counter)."""
        budget = budget if budget is not None else [MAX_IMAGES_PER_SECTION]
        parts = []
        for i, p in enumerate(paths):
            if budget[0] <= 0:
                parts.append(f'<p class="note">{len(paths) - i} more picture(s) not embedded (this '
                             "section's limit was reached).</p>")
                self.shown.update(paths[i:])
                break
            html_fig = self.figure(p, caption)
            if html_fig:
                budget[0] -= 1
            parts.append(html_fig)
        return "".join(parts)

    def add(self, sid: str, heading: str, explain: str, body: str) -> None:
        if body.strip():
            self.sections.append((sid, heading, f'<p class="explain">{esc(explain)}</p>{body}'))


__all__ = ["CSS", "MAX_IMAGES_PER_SECTION", "MAX_TABLE_ROWS", "Builder", "cell", "csv_table", "details", "esc",
           "fmt", "table"]
