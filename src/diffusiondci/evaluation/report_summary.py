"""The report's summary: the answer a reader came for, at the top of the page.

In this order, each part only when the folder holds its material:

0. for a demo's output folder, the table the demo ends with and its findings in words
   (:mod:`.report_demo`);
1. for each comparison (:mod:`.report_comparison`): one sentence naming the best model, its score
   with the spread over seeds and its paired gain over the plain U-Net; then the table method x
   Dice / mIoU (mean ± std over seeds, gain over the plain U-Net), best row highlighted, and the
   experiment's plots;
2. the whole test slides: each slide's scores and its predicted map next to the truth
   (:mod:`.report_slides`);
3. generated samples: the contact sheets (each row: the mask asked for, the reference, the images);
4. training curves: one line per compared run (loss, validation Dice), or the curves of a single run.

Only plain-language labels are printed here; raw keys and settings stay in the folded sections below.
Pictures shown here are marked in :attr:`Builder.in_summary` so that the sections below skip them.
"""

from __future__ import annotations

from pathlib import Path

from .report_comparison import Comparison, Row, Stat, best_row, comparisons, seg_method_label
from .report_curves import compared_curves_png, curve_png
from .report_demo import demo_html
from .report_files import Found, Unreadable, read_csv, read_json
from .report_html import Builder, esc, fmt
from .report_slides import slides_html

#: Contact sheets shown in the summary (the rest below, under Generated samples).
MAX_SHEETS = 2
#: Runs drawn together in the summary's training curves.
MAX_CURVES = 8


def _stat(s: Stat | None) -> str:
    if s is None:
        return "—"
    spread = f" ± {s.std:.3f}" if s.std is not None and (s.n or 0) > 1 else ""
    return f"{s.mean:.3f}{spread}"


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def _gain(row: Row, m: str) -> str:
    g = row.gains.get(m)
    if g is None:
        return "—"
    spread = f" ± {g.std:.3f}" if g.std is not None and g.wins and not g.wins.endswith("/1") else ""
    return f"{_signed(g.mean)}{spread}{_wins(g.wins)}"


def _wins(wins: str | None) -> str:
    """``"2/3"`` -> `` (better in 2 of 3 seeds)``."""
    k, _, n = (wins or "").partition("/")
    if not n:
        return ""
    return f" (better in {k} of {n} seed{'' if n == '1' else 's'})"


def _seeds(row: Row) -> str:
    return "—" if row.n is None else str(row.n)


def headline(comp: Comparison) -> str:
    """One sentence: the best row, its score and spread, its gain over the baseline."""
    best = best_row(comp)
    if best is None:
        return ""
    m = comp.metrics[0]
    name = ", ".join(v if h == "method" else f"{h} {fmt(v)}"
                     for h, v in zip(comp.headers, best.setting, strict=True) if v) or "the best setting"
    s = best.values[m]
    over = f" over {s.n} seeds" if s.n and s.n > 1 else ""
    text = f"<b>Best: {esc(name)}</b> — {esc(m)} {esc(_stat(s))}{esc(over)}"
    other = [x for x in comp.metrics[1:] if x in best.values]
    if other:
        text += ", " + ", ".join(f"{esc(x)} {esc(_stat(best.values[x]))}" for x in other)
    g = best.gains.get(m)
    if g is not None and comp.baseline:
        text += f"; {esc(_signed(g.mean))} {esc(m)} over the {esc(comp.baseline)} of the same seed{esc(_wins(g.wins))}"
    return f'<p class="answer">{text}.</p>'


def comparison_table(comp: Comparison) -> str:
    best = best_row(comp)
    gain_cols = [m for m in comp.metrics if any(m in r.gains for r in comp.rows)] if comp.baseline else []
    head = [*comp.headers, *(f"{m} (mean ± std)" for m in comp.metrics), "seeds",
            *(f"{m} gain over the {comp.baseline}" for m in gain_cols)]
    out = ['<table class="summary"><thead><tr>', *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in comp.rows:
        css = ' class="best"' if r is best else ""
        cells = [f"<td>{esc(fmt(v))}</td>" for v in r.setting]
        cells += [f'<td class="num">{esc(_stat(r.values.get(m)))}</td>' for m in comp.metrics]
        cells.append(f'<td class="num">{esc(_seeds(r))}</td>')
        cells += [f'<td class="num">{esc(_gain(r, m))}</td>' for m in gain_cols]
        out.append(f"<tr{css}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _comparison_html(b: Builder, comp: Comparison) -> str:
    where = b.rel(comp.source)
    parts = [f"<h3>{esc(comp.title)}</h3>", headline(comp), comparison_table(comp)]
    note = ("Mean ± standard deviation over seeds; the gain is the difference to the "
            f"{comp.baseline} trained with the same seed (the same labelled slides), averaged over seeds."
            if comp.baseline else "Mean ± standard deviation over seeds.")
    parts.append(f'<p class="note">{esc(note)} Source: <code>{esc(where)}</code>.</p>')
    if comp.plots:
        b.in_summary.update(comp.plots)
        parts.append(b.figures(comp.plots))
    return "".join(parts)


def _curves(b: Builder, found: Found, comps: list[Comparison]) -> str:
    """Compared runs together; else the single training log of the folder, if there is only one."""
    runs = [r for c in comps for r in c.runs][:MAX_CURVES]
    logs: list[tuple[str, Path]] = []
    if runs:
        for run in runs:
            if (run / "log.csv").is_file():
                try:
                    config = read_json(run / "config.json")
                    label = seg_method_label(config) if isinstance(config, dict) else run.name
                except Unreadable:
                    label = run.name
                logs.append((f"{label} ({run.name})", run / "log.csv"))
    if not logs:
        return _single_curve(b, found) if not comps else ""
    series = []
    for label, path in logs:
        try:
            series.append((label, read_csv(path)[1]))
        except Unreadable:
            continue  # reported in the curves section
    try:
        uri = compared_curves_png(series)
    except Exception:  # noqa: BLE001 - odd logs only cost the picture; the curves section reports them
        return ""
    if uri is None:
        return ""
    return (f'<figure><img src="{uri}" alt="training curves of the compared runs">'
            "<figcaption>training loss and validation Dice of the compared runs, by optimisation step"
            "</figcaption></figure>")


def _single_curve(b: Builder, found: Found) -> str:
    """The curves of the folder's only training log (a report on one run)."""
    if len(found.logs) != 1:
        return ""
    path = found.logs[0]
    try:
        fields, rows = read_csv(path)
        uri = curve_png(fields, rows, b.rel(path.parent))
    except Exception:  # noqa: BLE001 - the curves section below reports the failure
        return ""
    if uri is None:
        return ""
    b.in_summary.add(path)
    return (f'<figure><img src="{uri}" alt="training curves"><figcaption>training curves by optimisation '
            f"step — <code>{esc(b.rel(path))}</code></figcaption></figure>")


def summary_section(b: Builder, found: Found) -> str:
    """The summary's HTML ("" when the folder holds nothing to summarise)."""
    comps = comparisons(b, found)
    demo = demo_html(b)
    parts = ([demo] if demo else []) + [_comparison_html(b, c) for c in comps]
    slides = slides_html(b, found)
    if slides:
        parts.append("<h3>Test slides: prediction next to the truth</h3>" + slides)
    sheets = [p for p in found.pngs if p.name == "contact_sheet.png"][:MAX_SHEETS]
    if sheets:
        b.in_summary.update(sheets)
        parts.append("<h3>Generated samples</h3>"
                     "<p>Each row: the class mask the generator was asked to follow, the reference image "
                     "whose appearance it imitates, then the generated images.</p>"
                     + b.figures(sheets, "mask | reference | generated samples"))
    curves = _curves(b, found, comps)
    if curves:
        parts.append("<h3>Training</h3>" + curves)
    return "".join(parts)


__all__ = ["comparison_table", "headline", "summary_section"]
