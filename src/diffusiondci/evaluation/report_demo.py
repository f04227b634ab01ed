"""The report's demo part: the table ``diffusiondci demo`` ends with, and its findings in words."""

from __future__ import annotations

from .report_files import Unreadable, read_json
from .report_html import Builder, esc

#: Written by :func:`diffusiondci.demo.run_demo` at the top of its output folder.
RESULTS_NAME = "demo_results.json"


def _num(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def demo_html(b: Builder) -> str:
    """The demo's results table and findings ("" when the folder is not a demo's output)."""
    path = b.root / RESULTS_NAME
    if not path.is_file():
        return ""
    try:
        results = read_json(path)
        patches, slides = dict(results["patches"]), dict(results["slides"])
        findings = [str(f) for f in results.get("findings", [])]
    except (Unreadable, KeyError, TypeError, ValueError) as exc:
        b.warn(path, exc if isinstance(exc, Unreadable) else Unreadable(f"not a demo results file ({exc})"))
        return ""
    head = ["", "Dice per image", "Dice pooled over the test set", "mIoU", "training minutes"]
    rows = []
    for name, r in patches.items():
        minutes = r.get("wall_s") / 60 if isinstance(r.get("wall_s"), (int, float)) else None
        rows.append([f"test patches: {name}", _num(r.get("mean_dice")), _num(r.get("dataset_dice")),
                     _num(r.get("mean_iou")), "—" if minutes is None else f"{minutes:.1f}"])
    for name, r in slides.items():
        rows.append([f"whole test slide(s), {name}", _num(r.get("mean_dice")), "—", _num(r.get("mean_iou")), "—"])
    table = ['<table class="summary"><thead><tr>', *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        table.append("<tr>" + f"<td>{esc(row[0])}</td>" + "".join(f'<td class="num">{esc(c)}</td>' for c in row[1:])
                     + "</tr>")
    table.append("</tbody></table>")
    words = "".join(f"<li>{esc(f)}</li>" for f in findings)
    return ("<h3>What the demo shows</h3>" + "".join(table) + (f"<ul>{words}</ul>" if words else "")
            + f'<p class="note">Source: <code>{esc(b.rel(path))}</code>.</p>')


__all__ = ["RESULTS_NAME", "demo_html"]
