"""The report's experiment results: ``experiment.json``, ``summary.csv``, ``paired.csv``, ``results.csv``.

``X_mean`` / ``X_std`` columns are shown as one ``X (mean ± std)`` column. The tables keep the raw
column names, so they are folded (the summary at the top reads them for the reader); the PNG plots
beside the files follow unless the summary shows them already.
"""

from __future__ import annotations

from .report_files import Found, Unreadable, number, read_csv, read_json
from .report_html import MAX_IMAGES_PER_SECTION, MAX_TABLE_ROWS, Builder, cell, csv_table, details, esc, fmt, table
from .report_metrics import flatten

_MEAN_STD = (("_mean", "_std"), ("mean_", "std_"))


def _mean_std_table(fields: list[str], rows: list[dict[str, str]]) -> str:
    """``X_mean`` + ``X_std`` (or ``mean_X`` + ``std_X``) become one ``X (mean ± std)`` column."""
    cols: list[tuple[str, str, str | None]] = []  # (header, value field, std field)
    used: set[str] = set()
    for f in fields:
        if f in used:
            continue
        pair = None
        for m, s in _MEAN_STD:
            if f.endswith(m) and m.startswith("_") and f[: -len(m)] + s in fields:
                pair = (f[: -len(m)], f[: -len(m)] + s)
            elif f.startswith(m) and m.endswith("_") and s + f[len(m):] in fields:
                pair = (f[len(m):], s + f[len(m):])
        if pair is None and f + "_std" in fields:
            pair = (f, f + "_std")
        if pair is not None:
            cols.append((f"{pair[0]} (mean ± std)", f, pair[1]))
            used.update((f, pair[1]))
        else:
            cols.append((f, f, None))
            used.add(f)
    body = []
    for r in rows[:MAX_TABLE_ROWS]:
        cells = []
        for _, vf, sf in cols:
            if sf is not None and number(r.get(vf)) is not None:
                std = number(r.get(sf))
                text = fmt(number(r[vf])) + (f" ± {fmt(std)}" if std is not None else "")
                cells.append(f'<td class="num">{esc(text)}</td>')
            else:
                cells.append(cell(r.get(vf, "")))
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (f'<p class="note">first {MAX_TABLE_ROWS} of {len(rows)} rows shown</p>'
            if len(rows) > MAX_TABLE_ROWS else "")
    head = "".join(f"<th>{esc(h)}</th>" for h, _, _ in cols)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"


def experiments_section(b: Builder, found: Found) -> str:
    parts = []
    budget = [MAX_IMAGES_PER_SECTION]
    for exp in found.experiments:
        parts.append(f"<h3>{esc(b.rel(exp))}</h3>")
        if (exp / "experiment.json").is_file():
            try:
                info = read_json(exp / "experiment.json")
                if isinstance(info, dict):
                    if "name" in info:
                        parts.append(f"<p><b>Experiment:</b> {esc(info['name'])}</p>")
                    flat = flatten({k: v for k, v in info.items() if k != "name"})
                    if flat:
                        parts.append(details("settings", table(["setting", "value"], flat.items())))
                else:
                    parts.append(f"<p>{esc(fmt(info))}</p>")
            except Unreadable as exc:
                b.warn(exp / "experiment.json", exc)
        for name, caption in (("summary.csv", "summary over seeds (mean ± standard deviation)"),
                              ("paired.csv", "gain over the baseline run of the same seed (mean ± standard deviation "
                                             "over seeds; wins: seeds above the baseline)"),
                              ("results.csv", None)):
            p = exp / name
            if not p.is_file():
                continue
            try:
                fields, rows = read_csv(p)
            except Unreadable as exc:
                b.warn(p, exc)
                continue
            if caption is None:
                parts.append(details(f"raw results, one row per run and seed ({len(rows)} rows)",
                                     csv_table(fields, rows)))
            else:
                parts.append(details(f"{caption} ({name})", _mean_std_table(fields, rows)))
        pngs = sorted(p for p in found.pngs if p.parent == exp and p not in b.in_summary)
        parts.append(b.figures(pngs, budget=budget))
    return "".join(parts)


__all__ = ["experiments_section"]
