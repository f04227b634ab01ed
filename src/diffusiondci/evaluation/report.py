"""``diffusiondci report``: one self-contained HTML page that summarises a run or experiment folder.

The page is meant to be opened by a clinician-researcher on any machine, offline: every picture is
embedded as a ``data:image/png;base64`` URI (large PNGs are downscaled to at most
:data:`MAX_SIDE` px with PIL first), the style sheet is inline, there is no JavaScript and no link to
anything outside the file. All text taken from the folder is HTML-escaped.

:func:`render_report` walks the folder recursively (``checkpoints/``, ``tb/``, hidden folders and
the ``images/`` / ``masks/`` folders of datasets are skipped) and builds the sections it finds
material for, in this order:

1. overview: title, date, folder and one row per run (a folder with ``config.json``);
2. experiment results: ``experiment.json``, ``summary.csv`` (``X_mean`` / ``X_std`` columns shown as
   ``mean ± std``), ``paired.csv`` (gains over a baseline, same seed), ``results.csv`` (collapsible)
   and the PNG plots beside them;
3. metrics tables: every ``metrics.json`` (nested dicts flattened, per-class values as a class
   table, numbers to 4 significant digits) and ``per_image.csv`` (collapsible);
4. training curves drawn from every ``log.csv`` with matplotlib (Agg canvas, no pyplot state);
5. generated samples: ``contact_sheet.png``, ``progression.png``, latest ``samples/step_*/samples.png``;
6. probe: ``probe_heatmap.png``, ``probe.csv`` (block x timestep grid of mIoU), ``probe.json``;
7. segmentation: ``confusion.png``, ``cases.png``, slide ``*_overlay.png`` with ``*_areas.json``;
8. other figures: any PNG not shown yet (capped).

Unreadable or corrupt files never stop the report: each becomes a line under "Warnings".
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import CLASS_NAMES, LABEL_COLOURS
from ..errors import UserInputError

#: Longest side of an embedded picture, in pixels.
MAX_SIDE = 1600
#: Narrower pictures are shown enlarged (by an integer factor up to 4).
MIN_SHOWN_WIDTH = 400
#: Pictures per section (and per list of runs); the rest are named in a note.
MAX_IMAGES_PER_SECTION = 24
#: Cap of the catch-all "Other figures" section.
MAX_OTHER_IMAGES = 8
#: Rows of a table before it is cut (raw CSV tables).
MAX_TABLE_ROWS = 500
#: Files larger than this are not parsed (JSON / CSV) or decoded (PNG).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Pictures with more pixels are refused (decompression bombs).
MAX_IMAGE_PIXELS = 200_000_000
#: Files visited before the walk stops (a report on a whole disk is not the point).
MAX_WALK_FILES = 50_000

SKIP_DIRS = {"checkpoints", "tb", "__pycache__"}
DATASET_MARKERS = ("dataset.json", "manifest.csv")
DEFAULT_NAME = "report.html"

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
"""


# --------------------------------------------------------------------------------------------
# the folder scan
# --------------------------------------------------------------------------------------------


@dataclass
class _Found:
    """Every file of interest under the root, by kind (paths sorted)."""

    runs: list[Path] = field(default_factory=list)  # folders with config.json
    experiments: list[Path] = field(default_factory=list)  # folders with experiment/summary/results
    metrics: list[Path] = field(default_factory=list)
    per_image: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    probe_csv: list[Path] = field(default_factory=list)
    probe_json: list[Path] = field(default_factory=list)
    areas: list[Path] = field(default_factory=list)
    truncated: bool = False


def _scan(root: Path) -> _Found:
    found = _Found()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        is_dataset = any(m in filenames for m in DATASET_MARKERS)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(".") and not (is_dataset and d in ("images", "masks"))
        )
        names = set(filenames)
        if "config.json" in names:
            found.runs.append(here)
        if names & {"experiment.json", "summary.csv", "results.csv"}:
            found.experiments.append(here)
        for name in sorted(filenames):
            count += 1
            if count > MAX_WALK_FILES:
                found.truncated = True
                return found
            p = here / name
            if name == "metrics.json":
                found.metrics.append(p)
            elif name == "per_image.csv":
                found.per_image.append(p)
            elif name == "log.csv":
                found.logs.append(p)
            elif name == "probe.csv":
                found.probe_csv.append(p)
            elif name == "probe.json":
                found.probe_json.append(p)
            elif name.endswith("_areas.json"):
                found.areas.append(p)
            elif name.lower().endswith(".png") and not name.startswith("."):
                found.pngs.append(p)
    return found


# --------------------------------------------------------------------------------------------
# reading files (every failure becomes a warning)
# --------------------------------------------------------------------------------------------


class _Unreadable(Exception):
    """A file that could not be used; the message goes to the warnings list."""


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _Unreadable(f"{size / 2**20:.0f} MiB is larger than the {MAX_FILE_BYTES // 2**20} MiB limit")


def _read_json(path: Path) -> Any:
    try:
        _check_size(path)
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Unreadable(f"not readable JSON ({exc})") from exc


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        _check_size(path)
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _Unreadable(f"not a readable CSV file ({exc})") from exc
    if not fields:
        raise _Unreadable("empty CSV file (no header)")
    return fields, rows


def _png_data_uri(path: Path) -> tuple[str, bool, int]:
    """The PNG as a data URI, downscaled to :data:`MAX_SIDE` px when larger (fully decoded first).

    A single-channel picture holding only labels 0-2 is a label mask, which would look black: it is
    shown in the class colours :data:`diffusiondci.LABEL_COLOURS` (second value True). The third value is the
    embedded width in pixels.
    """
    import numpy as np
    from PIL import Image

    try:
        _check_size(path)
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise _Unreadable(f"{im.width} x {im.height} px is too large to embed")
            im.load()  # decodes everything: a truncated file fails here
            is_mask = im.mode == "L" and int(np.asarray(im).max(initial=0)) <= 2
            if is_mask:
                im = Image.fromarray(np.asarray(LABEL_COLOURS, np.uint8)[np.asarray(im)])
            if im.format == "PNG" and max(im.size) <= MAX_SIDE and not is_mask:
                data = raw
            else:
                if im.mode not in ("RGB", "RGBA", "L", "LA"):
                    im = im.convert("RGBA")
                im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data = buf.getvalue()
            width = im.width
    except _Unreadable:
        raise
    except Image.UnidentifiedImageError as exc:
        raise _Unreadable("not an image file (PIL cannot identify it)") from exc
    except Exception as exc:  # PIL raises many types on damaged files (OSError, SyntaxError, ...)
        raise _Unreadable(f"not a readable PNG ({type(exc).__name__}: {exc})") from exc
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), is_mask, width


def _number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(str(text).strip())
    except ValueError:
        return None


def _fmt(value: Any) -> str:
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
        v = _number(value)
        if (v is not None and re.fullmatch(r"\s*[-+]?[\d.]+(e[-+]?\d+)?\s*", value, re.IGNORECASE)
                and not re.match(r"\s*0\d", value)):  # keep zero-padded ids as written
            return _fmt(int(v) if re.fullmatch(r"\s*[-+]?\d+\s*", value) else v)
        return value
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# HTML building blocks
# --------------------------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e(text: Any) -> str:
    """HTML-escaped text without control characters (a damaged file may hold NUL bytes)."""
    return html.escape(_CONTROL.sub("\ufffd", str(text)), quote=True)


def _cell(value: Any, tag: str = "td", css: str = "") -> str:
    text = _fmt(value)
    cls = ["num"] if tag == "td" and _number(value) is not None else []
    cls += [css] if css else []
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<{tag}{attr}>{_e(text)}</{tag}>"


def _table(header: Sequence[Any], rows: Iterable[Sequence[Any]], limit: int | None = None) -> str:
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in shown:
        out.append("<tr>" + "".join(_cell(v) for v in r) + "</tr>")
    out.append("</tbody></table>")
    if len(shown) < len(rows):
        out.append(f'<p class="note">first {len(shown)} of {len(rows)} rows shown</p>')
    return "".join(out)


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


class _Builder:
    """Accumulates sections, warnings and the set of PNGs already shown."""

    def __init__(self, root: Path):
        self.root = root
        self.sections: list[tuple[str, str, str]] = []  # (id, heading, html)
        self.warnings: list[str] = []
        self.shown: set[Path] = set()

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
            uri, is_mask, width = _png_data_uri(path)
        except (_Unreadable, OSError) as exc:
            self.warn(path, exc)
            return ""
        if is_mask:
            legend = "label mask: blue background, green benign, yellow malignant"
            caption = f"{caption}; {legend}" if caption else legend
        cap = _e(caption) + " — " if caption else ""
        # small pictures (64 px patches) are enlarged with sharp pixels so that they can be seen
        zoom = min(4, MIN_SHOWN_WIDTH // max(width, 1))
        style = f' style="width:{zoom * width}px;image-rendering:pixelated"' if zoom > 1 else ""
        return (f'<figure><img src="{uri}" alt="{_e(path.name)}"{style}>'
                f"<figcaption>{cap}<code>{_e(self.rel(path))}</code></figcaption></figure>")

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
            self.sections.append((sid, heading, f'<p class="explain">{_e(explain)}</p>{body}'))


# --------------------------------------------------------------------------------------------
# section 1: overview
# --------------------------------------------------------------------------------------------

_KEY_SETTINGS = ("preset", "data", "encoder", "model", "unet", "decoder_norm", "use_reference", "mode",
                 "label_fraction", "synthetic_ratio", "image_size", "patch_size", "lr", "batch_size", "seed")


def _short(value: Any) -> Any:
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name or value
    return value


def _key_settings(config: dict[str, Any], limit: int = 8) -> str:
    scalars = {k: v for k, v in config.items()
               if k != "stage" and (v is None or isinstance(v, (str, int, float, bool)))}
    keys = [k for k in _KEY_SETTINGS if k in scalars]
    keys += [k for k in scalars if k not in keys]
    return ", ".join(f"{k}={_fmt(_short(scalars[k]))}" for k in keys[:limit])


def _last_step(log: Path) -> int | None:
    try:
        _, rows = _read_csv(log)
    except _Unreadable:
        return None
    steps = [v for v in (_number(r.get("step")) for r in rows) if v is not None]
    return int(max(steps)) if steps else None


def _run_row(b: _Builder, run: Path) -> list[Any]:
    try:
        config = _read_json(run / "config.json")
        if not isinstance(config, dict):
            raise _Unreadable("config.json is not a JSON object")
    except _Unreadable as exc:
        b.warn(run / "config.json", exc)
        config = {}
    steps, status = None, None
    if (run / "metrics.json").is_file():
        try:
            m = _read_json(run / "metrics.json")
            if isinstance(m, dict) and _number(m.get("step")) is not None:
                steps = f"{int(_number(m['step']))}"
                if _number(m.get("max_steps")) is not None:
                    steps += f" / {int(_number(m['max_steps']))}"
                status = m.get("status")
        except _Unreadable:
            pass  # reported in the metrics section
    if steps is None and (run / "log.csv").is_file():
        last = _last_step(run / "log.csv")
        steps = str(last) if last is not None else None
    return [b.rel(run), config.get("stage", "—"), steps, status, _key_settings(config)]


def _overview(b: _Builder, found: _Found, title: str) -> str:
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">Generated {_e(now)} from the folder <code>{_e(b.root)}</code>.</p>']
    if found.runs:
        rows = [_run_row(b, r) for r in found.runs]
        parts.append('<p class="explain">Each row is one training or evaluation run (a folder with a '
                     "config.json): the stage it belongs to, how many optimisation steps were done, "
                     "and its main settings.</p>")
        parts.append(_table(["run folder", "stage", "steps done", "status", "key settings"], rows,
                            limit=MAX_TABLE_ROWS))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# section 2: experiments
# --------------------------------------------------------------------------------------------

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
            if sf is not None and _number(r.get(vf)) is not None:
                std = _number(r.get(sf))
                text = _fmt(_number(r[vf])) + (f" ± {_fmt(std)}" if std is not None else "")
                cells.append(f'<td class="num">{_e(text)}</td>')
            else:
                cells.append(_cell(r.get(vf, "")))
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (f'<p class="note">first {MAX_TABLE_ROWS} of {len(rows)} rows shown</p>'
            if len(rows) > MAX_TABLE_ROWS else "")
    head = "".join(f"<th>{_e(h)}</th>" for h, _, _ in cols)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"


def _csv_table(fields: list[str], rows: list[dict[str, str]]) -> str:
    return _table(fields, ([r.get(f, "") for f in fields] for r in rows), limit=MAX_TABLE_ROWS)


def _experiments(b: _Builder, found: _Found) -> str:
    parts = []
    budget = [MAX_IMAGES_PER_SECTION]
    for exp in found.experiments:
        parts.append(f"<h3>{_e(b.rel(exp))}</h3>")
        if (exp / "experiment.json").is_file():
            try:
                info = _read_json(exp / "experiment.json")
                if isinstance(info, dict):
                    if "name" in info:
                        parts.append(f"<p><b>Experiment:</b> {_e(info['name'])}</p>")
                    flat = _flatten({k: v for k, v in info.items() if k != "name"})
                    if flat:
                        parts.append(_details("settings", _table(["setting", "value"], flat.items())))
                else:
                    parts.append(f"<p>{_e(_fmt(info))}</p>")
            except _Unreadable as exc:
                b.warn(exp / "experiment.json", exc)
        for name, caption in (("summary.csv", "Summary over seeds (mean ± standard deviation):"),
                              ("paired.csv", "Gain over the baseline run of the same seed (mean ± standard deviation "
                                             "over seeds; wins: seeds above the baseline):"),
                              ("results.csv", None)):
            p = exp / name
            if not p.is_file():
                continue
            try:
                fields, rows = _read_csv(p)
            except _Unreadable as exc:
                b.warn(p, exc)
                continue
            if caption is None:
                parts.append(_details(f"raw results, one row per run and seed ({len(rows)} rows)",
                                      _csv_table(fields, rows)))
            else:
                parts.append(f"<p>{_e(caption)}</p>")
                parts.append(_mean_std_table(fields, rows))
        pngs = sorted(p for p in found.pngs if p.parent == exp)
        parts.append(b.figures(pngs, budget=budget))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# section 3: metrics
# --------------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
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
            and all(v is None or _number(v) is not None for v in data)):
        name = prefix.replace("_per_class", "").replace("per_class.", "").replace(".per_class", "")
        per_class[name or label] = dict(zip(CLASS_NAMES, data, strict=True))
        return per_class, other
    if data != {} and data != []:  # empty containers say nothing
        other.append((prefix or label, data))
    return per_class, other


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, list) and 0 < len(v) <= 12 and all(isinstance(r, list) and len(r) == len(v) for r in v)
            and all(_number(x) is not None for r in v for x in r))


def _fraction_note(values: dict[str, Any]) -> dict[str, Any]:
    """Class fractions that sum to 1 are also shown as percentages."""
    nums = [_number(v) for v in values.values()]
    if nums and all(n is not None and 0 <= n <= 1 for n in nums) and abs(sum(nums) - 1) < 1e-3:  # type: ignore[arg-type]
        return {k: f"{_fmt(_number(v))} ({100 * _number(v):.1f} %)" for k, v in values.items()}  # type: ignore[operator]
    return values


def _metrics_html(data: Any, fractions: bool = False, label: str = "value", fold_other: bool = False) -> str:
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
        parts.append(_table(["per class", *classes], rows))
    scalars = [(k, v) for k, v in other if not _is_matrix(v)]
    if scalars:
        table = _table(["measure", "value"], scalars)
        parts.append(_details("details and settings", table) if fold_other and per_class else table)
    for k, v in other:
        if _is_matrix(v):
            names = list(CLASS_NAMES) if len(v) == len(CLASS_NAMES) else [str(i) for i in range(len(v))]
            parts.append(f"<p>{_e(k)} (rows: truth, columns: prediction)</p>")
            parts.append(_table(["", *names], ([n, *r] for n, r in zip(names, v, strict=True))))
    return "".join(parts)


def _json_tables(b: _Builder, paths: list[Path]) -> str:
    """Each JSON file as a heading and a table; unreadable files become warnings."""
    parts = []
    for p in paths:
        try:
            data = _read_json(p)
        except _Unreadable as exc:
            b.warn(p, exc)
            continue
        parts.append(f"<h3>{_e(b.rel(p))}</h3>{_metrics_html(data)}")
    return "".join(parts)


def _metrics(b: _Builder, found: _Found) -> str:
    parts = [_json_tables(b, found.metrics)]
    for p in found.per_image:
        try:
            fields, rows = _read_csv(p)
        except _Unreadable as exc:
            b.warn(p, exc)
            continue
        parts.append(_details(f"per-image scores: {b.rel(p)} ({len(rows)} images)", _csv_table(fields, rows)))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# section 4: training curves
# --------------------------------------------------------------------------------------------

_NOT_CURVES = {"step", "epoch", "wall_time", "lr", "steps_per_s"}


def _series(rows: list[dict[str, str]], col: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = _number(r.get("step")), _number(r.get(col))
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _curve_png(fields: list[str], rows: list[dict[str, str]], title: str) -> str | None:
    """Train-loss panel (+ validation panel when ``val_*`` columns exist) as a PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "step" not in fields:
        raise _Unreadable("log.csv has no 'step' column")
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
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=c)
        every = [y for c in cols for y in _series(rows, c)[1]]
        if name == "training" and every and min(every) > 0 and max(every) / min(every) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(b: _Builder, found: _Found) -> str:
    parts = []
    for i, p in enumerate(found.logs):
        if i >= MAX_IMAGES_PER_SECTION:
            parts.append(f'<p class="note">{len(found.logs) - i} more log(s) not drawn.</p>')
            break
        try:
            fields, rows = _read_csv(p)
            uri = _curve_png(fields, rows, b.rel(p.parent))
        except _Unreadable as exc:
            b.warn(p, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a plotting failure on odd data must not stop the report
            b.warn(p, _Unreadable(f"could not draw curves ({type(exc).__name__}: {exc})"))
            continue
        if uri is None:
            continue
        parts.append(f'<figure><img src="{uri}" alt="training curves">'
                     f"<figcaption>{len(rows)} logged rows — <code>{_e(b.rel(p))}</code></figcaption></figure>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# sections 5-8: pictures
# --------------------------------------------------------------------------------------------


def _named(found: _Found, name: str) -> list[Path]:
    return [p for p in found.pngs if p.name == name]


def _latest_samples(found: _Found) -> list[Path]:
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


def _older_samples(found: _Found, latest: list[Path]) -> list[Path]:
    return [p for p in found.pngs if p.name == "samples.png" and p.parent.parent.name == "samples"
            and re.fullmatch(r"step_\d+", p.parent.name) and p not in latest]


def _samples(b: _Builder, found: _Found) -> str:
    budget = [MAX_IMAGES_PER_SECTION]
    latest = _latest_samples(found)
    b.shown.update(_older_samples(found, latest))
    return (b.figures(_named(found, "contact_sheet.png"), "mask | reference | generated samples", budget)
            + b.figures(_named(found, "progression.png"), "denoising progression, noise to image", budget)
            + b.figures(latest, "latest samples during training", budget))


def _probe_grid(fields: list[str], rows: list[dict[str, str]]) -> str | None:
    """``block x timestep`` grid of mIoU, best cell highlighted (None when the columns differ)."""
    if not {"block", "timestep", "miou"} <= set(fields):
        return None
    cells = {(r["block"], r["timestep"]): _number(r["miou"]) for r in rows}
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    steps = sorted(dict.fromkeys(r["timestep"] for r in rows), key=lambda s: (_number(s) is None, _number(s) or 0, s))
    valid = [v for v in cells.values() if v is not None and math.isfinite(v)]
    top = max(valid) if valid else None
    out = ["<table><thead><tr><th>block \\ timestep</th>", *(f"<th>{_e(t)}</th>" for t in steps),
           "</tr></thead><tbody>"]
    for blk in blocks:
        out.append(f"<tr><th>{_e(blk)}</th>")
        for t in steps:
            v = cells.get((blk, t))
            out.append(_cell(v, css="best" if v is not None and v == top else ""))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _probe(b: _Builder, found: _Found) -> str:
    parts = [b.figures(_named(found, "probe_heatmap.png"), "segmentation quality (mIoU) per block and timestep")]
    for p in found.probe_csv:
        try:
            fields, rows = _read_csv(p)
        except _Unreadable as exc:
            b.warn(p, exc)
            continue
        grid = _probe_grid(fields, rows)
        parts.append(f"<h3>{_e(b.rel(p))}</h3>")
        if grid is not None:
            parts.append("<p>mIoU of a small classifier on the features of each decoder block at each noise "
                         "timestep (best cell in green):</p>" + grid)
            parts.append(_details("raw probe table", _csv_table(fields, rows)))
        else:
            parts.append(_csv_table(fields, rows))
    parts.append(_json_tables(b, found.probe_json))
    return "".join(parts)


def _segmentation(b: _Builder, found: _Found) -> str:
    budget = [MAX_IMAGES_PER_SECTION]
    parts = [b.figures(_named(found, "confusion.png"), "confusion matrix: rows truth, columns prediction", budget),
             b.figures(_named(found, "cases.png"), "example cases: image | truth | prediction", budget)]
    overlays = sorted(p for p in found.pngs if p.name.endswith("_overlay.png"))
    areas = {p.with_name(p.name[: -len("_areas.json")]): p for p in found.areas}
    for ov in overlays:
        stem = ov.with_name(ov.name[: -len("_overlay.png")])
        parts.append(f"<h3>{_e(stem.name)}</h3>" + b.figures([ov], "predicted classes over the slide", budget))
        a = areas.pop(stem, None)
        if a is not None:
            parts.append(_areas_html(b, a))
    for a in areas.values():
        parts.append(f"<h3>{_e(a.name)}</h3>" + _areas_html(b, a))
    return "".join(parts)


def _areas_html(b: _Builder, path: Path) -> str:
    try:
        data = _read_json(path)
    except _Unreadable as exc:
        b.warn(path, exc)
        return ""
    return ("<p>Area of each class; fractions also as percentages:</p>"
            + _metrics_html(data, fractions=True, label="fraction", fold_other=True))


def _other(b: _Builder, found: _Found) -> str:
    """Pictures no section claimed (inputs such as slides often among them): the shallowest first, and
    fewer of them than elsewhere so that a folder of raw images does not blow up the page."""
    rest = sorted((p for p in found.pngs if p not in b.shown), key=lambda p: (len(p.parts), str(p)))
    return b.figures(rest, budget=[MAX_OTHER_IMAGES])


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------

_EXPLAIN = {
    "experiments": "An experiment trains and evaluates the same pipeline under several settings, each "
                   "repeated with different random seeds; the summary gives the average and spread over seeds.",
    "metrics": "Scores written at the end of each run or evaluation. Dice and IoU measure the overlap between "
               "the predicted and the annotated regions (1 = perfect, 0 = none); precision is the share of "
               "predicted pixels that are correct, recall the share of annotated pixels that were found.",
    "curves": "How the training error (loss) evolved with the number of optimisation steps; a curve that "
              "levels off means training has converged. Validation curves are measured on held-out patches.",
    "samples": "Synthetic images made by the diffusion generator. In a contact sheet each row shows the "
               "class mask it was asked to follow, the reference image whose appearance it imitates, then "
               "the generated images.",
    "probe": "Which internal features of the diffusion model are most useful for segmentation: each decoder "
             "block and noise level was tested with a small classifier.",
    "segmentation": "Results of the tissue segmentation (background, benign, malignant): the confusion matrix, "
                    "example cases and slide-level maps with the area of each class.",
    "other": "Further pictures found in the folder.",
}


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<li><a href="#{sid}">{_e(h)}</a></li>' for sid, h, _ in sections[1:])
    body = []
    for i, (sid, heading, content) in enumerate(sections):
        head = f"<h2>{_e(heading)}</h2>" if i else ""
        body.append(f'<section id="{sid}">{head}{content}</section>')
        if i == 0 and nav:
            body.append(f"<nav><b>Contents</b><ul>{nav}</ul></nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def render_report(root: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Write the HTML report of ``root`` (a run or experiment folder) to ``out``; returns ``out``.

    ``out`` defaults to ``root/report.html`` and ``title`` to "DiffusionDCI report: <folder name>".
    Raises :class:`UserInputError` when ``root`` is not an existing folder.
    """
    root = Path(root)
    if not root.exists():
        raise UserInputError("folder not found; give a run or experiment folder", root)
    if not root.is_dir():
        raise UserInputError("is a file, not a folder; give a run or experiment folder", root)
    root = root.resolve()
    out = Path(out) if out is not None else root / DEFAULT_NAME
    title = title or f"DiffusionDCI report: {root.name}"

    found = _scan(root)
    b = _Builder(root)
    overview = _overview(b, found, title)
    for sid, heading, fn in (
        ("experiments", "Experiment results", _experiments),
        ("metrics", "Metrics", _metrics),
        ("curves", "Training curves", _curves),
        ("samples", "Generated samples", _samples),
        ("probe", "Feature probe", _probe),
        ("segmentation", "Segmentation", _segmentation),
        ("other", "Other figures", _other),
    ):
        b.add(sid, heading, _EXPLAIN[sid], fn(b, found))
    if found.truncated:
        b.warnings.append(f"the folder holds more than {MAX_WALK_FILES} files; the rest were not looked at")
    if not b.sections and not found.runs:
        overview += ('<p class="note">Nothing recognisable was found in this folder: no run folders '
                     "(config.json), experiment results (experiment.json, summary.csv), metrics.json, "
                     "log.csv or PNG figures.</p>")
    elif b.warnings:
        overview += f'<p class="note">{len(b.warnings)} file(s) could not be read; see Warnings at the end.</p>'
    sections = [("overview", "Overview", overview), *b.sections]
    if b.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in b.warnings)
        explain = '<p class="explain">These files were found but could not be used.</p>'
        sections.append(("warnings", "Warnings", f'{explain}<ul class="warn">{items}</ul>'))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(_page(title, sections), encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["MAX_IMAGES_PER_SECTION", "MAX_SIDE", "render_report"]
