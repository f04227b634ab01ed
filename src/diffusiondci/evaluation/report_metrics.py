"""The report's metrics tables: every ``metrics.json`` and ``per_image.csv`` of the folder, folded.

Nested JSON is flattened; per-class values (dicts keyed by class name, ``*per_class`` lists) become
one class table, square numeric lists a matrix, the rest key/value rows (:func:`metrics_html`, also
used for slide areas and probe summaries). The tables keep the raw keys, so each file is folded
under its name and mean Dice / mIoU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import CLASS_NAMES
from .report_files import Found, Unreadable, number, read_csv, read_json
from .report_html import Builder, csv_table, details, esc, fmt, table


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d} if prefix else {}


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _split_metrics(
    data: Any, prefix: str = "", label: str = "value"
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, Any]]]:
    """Per-class values ``{metric: {class: value}}`` and the other ``(key, value)`` pairs.

    Per-class values are dicts keyed by class names (``{class: value}``, or ``{class: {measure:
    value}}`` as in the ``classes`` of ``<slide>_areas.json``) and numeric lists of one value per
    class whose key mentions ``per_class`` (as :meth:`SegmentationScores.to_dict` writes them).
    """
    per_class: dict[str, dict[str, Any]] = {}
    other: list[tuple[str, Any]] = []
    by_class = isinstance(data, dict) and data and set(data) <= set(CLASS_NAMES)
    if by_class and all(map(_is_scalar, data.values())):
        per_class[prefix or label] = {c: data[c] for c in CLASS_NAMES if c in data}
        return per_class, other
    if by_class and all(isinstance(v, dict) and all(map(_is_scalar, v.values())) for v in data.values()):
        for c in CLASS_NAMES:
            for m, v in data.get(c, {}).items():
                name = m if prefix.rsplit(".", 1)[-1] in ("", "classes", "per_class") else f"{prefix}.{m}"
                per_class.setdefault(name, {})[c] = v
        return per_class, other
    if isinstance(data, dict) and data:
        for k, v in data.items():
            pc, ot = _split_metrics(v, f"{prefix}.{k}" if prefix else str(k), label)
            per_class.update(pc)
            other.extend(ot)
        return per_class, other
    if (isinstance(data, list) and len(data) == len(CLASS_NAMES) and "per_class" in prefix
            and all(v is None or number(v) is not None for v in data)):
        name = prefix.replace("_per_class", "").replace("per_class.", "").replace(".per_class", "")
        per_class[name or label] = dict(zip(CLASS_NAMES, data, strict=True))
        return per_class, other
    if data != {} and data != []:  # empty containers say nothing
        other.append((prefix or label, data))
    return per_class, other


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, list) and 0 < len(v) <= 12 and all(isinstance(r, list) and len(r) == len(v) for r in v)
            and all(number(x) is not None for r in v for x in r))


def _fraction_note(values: dict[str, Any]) -> dict[str, Any]:
    """Class fractions that sum to 1 are also shown as percentages."""
    nums = [number(v) for v in values.values()]
    if nums and all(n is not None and 0 <= n <= 1 for n in nums) and abs(sum(nums) - 1) < 1e-3:  # type: ignore[arg-type]
        return {k: f"{fmt(number(v))} ({100 * number(v):.1f} %)" for k, v in values.items()}  # type: ignore[operator]
    return values


def metrics_html(data: Any, fractions: bool = False, label: str = "value", fold_other: bool = False) -> str:
    """Tables of a JSON document: per-class values, other key/value pairs, square matrices.

    With ``fractions`` a per-class row whose values sum to 1 also shows percentages (class areas);
    with ``fold_other`` the key/value pairs go into a collapsed ``<details>`` (technical settings).
    """
    per_class, other = _split_metrics(data, label=label)
    parts = []
    if per_class:
        classes = [c for c in CLASS_NAMES if any(c in d for d in per_class.values())]
        rows = [[m] + [(_fraction_note(d) if fractions else d).get(c) for c in classes]
                for m, d in per_class.items()]
        parts.append(table(["per class", *classes], rows))
    scalars = [(k, v) for k, v in other if not _is_matrix(v)]
    if scalars:
        pairs = table(["measure", "value"], scalars)
        parts.append(details("details and settings", pairs) if fold_other and per_class else pairs)
    for k, v in other:
        if _is_matrix(v):
            names = list(CLASS_NAMES) if len(v) == len(CLASS_NAMES) else [str(i) for i in range(len(v))]
            parts.append(f"<p>{esc(k)} (rows: truth, columns: prediction)</p>")
            parts.append(table(["", *names], ([n, *r] for n, r in zip(names, v, strict=True))))
    return "".join(parts)


def _scores_note(data: Any) -> str:
    """``: Dice 0.845, mIoU 0.7`` for a document with mean scores ("" otherwise)."""
    if not isinstance(data, dict):
        return ""
    found = [(label, number(data.get(k))) for label, k in (("Dice", "mean_dice"), ("mIoU", "mean_iou"))]
    shown = [f"{label} {fmt(v)}" for label, v in found if v is not None]
    return ": " + ", ".join(shown) if shown else ""


def json_tables(b: Builder, paths: list[Path]) -> str:
    """Each JSON file as a folded table (raw keys) under its name; unreadable files become warnings."""
    parts = []
    for p in paths:
        try:
            data = read_json(p)
        except Unreadable as exc:
            b.warn(p, exc)
            continue
        parts.append(details(f"{b.rel(p)}{_scores_note(data)}", metrics_html(data)))
    return "".join(parts)


def metrics_section(b: Builder, found: Found) -> str:
    parts = [json_tables(b, found.metrics)]
    for p in found.per_image:
        try:
            fields, rows = read_csv(p)
        except Unreadable as exc:
            b.warn(p, exc)
            continue
        parts.append(details(f"per-image scores: {b.rel(p)} ({len(rows)} images)", csv_table(fields, rows)))
    return "".join(parts)


__all__ = ["flatten", "json_tables", "metrics_html", "metrics_section"]
