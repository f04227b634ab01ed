"""The report's picture sections: generated samples, feature probe, segmentation, other figures.

Samples: contact sheets, denoising progressions and the latest ``samples/step_*/samples.png`` of
each run. Probe: heat map and the ``block x timestep`` mIoU grid of ``probe.csv``. Segmentation:
confusion matrices, cases and slide overlays with the share of each class (the raw area tables
folded). Other: pictures no section claimed, capped at :data:`MAX_OTHER_IMAGES`. Pictures the
summary already shows are not repeated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .. import CLASS_NAMES
from .report_files import Found, Unreadable, number, read_csv, read_json
from .report_html import MAX_IMAGES_PER_SECTION, Builder, cell, csv_table, details, esc
from .report_metrics import json_tables, metrics_html

#: Cap of the catch-all "Other figures" section.
MAX_OTHER_IMAGES = 8


def _named(found: Found, name: str) -> list[Path]:
    return [p for p in found.pngs if p.name == name]


def _latest_samples(found: Found) -> list[Path]:
    """``samples/step_<N>/samples.png``: the largest N per samples folder (older ones are hidden)."""
    best: dict[Path, tuple[int, Path]] = {}
    for p in found.pngs:
        step_dir = p.parent
        m = re.fullmatch(r"step_(\d+)", step_dir.name)
        if p.name == "samples.png" and m and step_dir.parent.name == "samples":
            n = int(m.group(1))
            if step_dir.parent not in best or n > best[step_dir.parent][0]:
                best[step_dir.parent] = (n, p)
    return [p for _, p in sorted(best.values(), key=lambda t: str(t[1]))]


def _older_samples(found: Found, latest: list[Path]) -> list[Path]:
    return [p for p in found.pngs if p.name == "samples.png" and p.parent.parent.name == "samples"
            and re.fullmatch(r"step_\d+", p.parent.name) and p not in latest]


def samples_section(b: Builder, found: Found) -> str:
    budget = [MAX_IMAGES_PER_SECTION]
    latest = _latest_samples(found)
    b.shown.update(_older_samples(found, latest))
    sheets = [p for p in _named(found, "contact_sheet.png") if p not in b.in_summary]
    return (b.figures(sheets, "mask | reference | generated samples", budget)
            + b.figures(_named(found, "progression.png"), "denoising progression, noise to image", budget)
            + b.figures(latest, "latest samples during training", budget))


def _probe_grid(fields: list[str], rows: list[dict[str, str]]) -> str | None:
    """``block x timestep`` grid of mIoU, best cell highlighted (None when the columns differ)."""
    if not {"block", "timestep", "miou"} <= set(fields):
        return None
    cells = {(r["block"], r["timestep"]): number(r["miou"]) for r in rows}
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    steps = sorted(dict.fromkeys(r["timestep"] for r in rows), key=lambda s: (number(s) is None, number(s) or 0, s))
    valid = [v for v in cells.values() if v is not None and math.isfinite(v)]
    top = max(valid) if valid else None
    out = ["<table><thead><tr><th>block \\ timestep</th>", *(f"<th>{esc(t)}</th>" for t in steps),
           "</tr></thead><tbody>"]
    for blk in blocks:
        out.append(f"<tr><th>{esc(blk)}</th>")
        for t in steps:
            v = cells.get((blk, t))
            out.append(cell(v, css="best" if v is not None and v == top else ""))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def probe_section(b: Builder, found: Found) -> str:
    parts = [b.figures(_named(found, "probe_heatmap.png"), "segmentation quality (mIoU) per block and timestep")]
    for p in found.probe_csv:
        try:
            fields, rows = read_csv(p)
        except Unreadable as exc:
            b.warn(p, exc)
            continue
        grid = _probe_grid(fields, rows)
        parts.append(f"<h3>{esc(b.rel(p))}</h3>")
        if grid is not None:
            parts.append("<p>mIoU of a small classifier on the features of each decoder block at each noise "
                         "timestep (best cell in green):</p>" + grid)
            parts.append(details("raw probe table", csv_table(fields, rows)))
        else:
            parts.append(csv_table(fields, rows))
    parts.append(json_tables(b, found.probe_json))
    return "".join(parts)


def segmentation_section(b: Builder, found: Found) -> str:
    budget = [MAX_IMAGES_PER_SECTION]
    parts = [b.figures(_named(found, "confusion.png"), "confusion matrix: rows truth, columns prediction", budget),
             b.figures(_named(found, "cases.png"), "example cases: image | truth | prediction", budget)]
    overlays = sorted(p for p in found.pngs if p.name.endswith("_overlay.png"))
    areas = {p.with_name(p.name[: -len("_areas.json")]): p for p in found.areas}
    for ov in overlays:
        stem = ov.with_name(ov.name[: -len("_overlay.png")])
        shown = ('<p class="note">The predicted map is shown next to the truth in the summary.</p>'
                 if ov in b.in_summary else b.figures([ov], "predicted classes over the slide", budget))
        parts.append(f"<h3>{esc(stem.name)}</h3>" + shown)
        a = areas.pop(stem, None)
        if a is not None:
            parts.append(_areas_html(b, a))
    for a in areas.values():
        parts.append(f"<h3>{esc(a.name)}</h3>" + _areas_html(b, a))
    return "".join(parts)


def _areas_html(b: Builder, path: Path) -> str:
    try:
        data = read_json(path)
    except Unreadable as exc:
        b.warn(path, exc)
        return ""
    shares = _area_shares(data)
    line = ("<p>Share of the slide: " + ", ".join(f"{esc(c)} {100 * v:.1f} %" for c, v in shares.items())
            + "</p>") if shares else ""
    return line + details("area of each class (pixels, fractions)",
                          metrics_html(data, fractions=True, label="fraction", fold_other=True))


def _area_shares(data: object) -> dict[str, float]:
    """``{class: fraction of the slide}`` of an ``_areas.json`` (``classes`` layout or flat fractions)."""
    classes = data.get("classes", data) if isinstance(data, dict) else {}
    shares = {}
    for c in CLASS_NAMES:
        v = classes.get(c) if isinstance(classes, dict) else None
        v = number(v.get("fraction_of_slide") if isinstance(v, dict) else v)
        if v is not None and 0 <= v <= 1:
            shares[c] = v
    return shares


def other_section(b: Builder, found: Found) -> str:
    """Pictures no section claimed (inputs such as slides often among them): the shallowest first, and
    fewer of them than elsewhere so that a folder of raw images does not blow up the page."""
    rest = sorted((p for p in found.pngs if p not in b.shown), key=lambda p: (len(p.parts), str(p)))
    return b.figures(rest, budget=[MAX_OTHER_IMAGES])


__all__ = ["MAX_OTHER_IMAGES", "other_section", "probe_section", "samples_section", "segmentation_section"]
