"""Finding and safely reading the files a report is made of.

:func:`scan_folder` walks a folder (skipping ``checkpoints/``, ``tb/``, hidden folders and the
``images/`` / ``masks/`` folders of datasets) and sorts what it finds by kind; the readers refuse
files over :data:`MAX_FILE_BYTES` and raise :class:`Unreadable` on damage, so that each failure
becomes one line under "Warnings" instead of stopping the report. Pictures are returned as
``data:image/png;base64`` URIs, downscaled to at most :data:`MAX_SIDE` px.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import LABEL_COLOURS

#: Longest side of an embedded picture, in pixels.
MAX_SIDE = 1600
#: Files larger than this are not parsed (JSON / CSV) or decoded (PNG).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Pictures with more pixels are refused (decompression bombs).
MAX_IMAGE_PIXELS = 200_000_000
#: Files visited before the walk stops (a report on a whole disk is not the point).
MAX_WALK_FILES = 50_000

SKIP_DIRS = {"checkpoints", "tb", "__pycache__"}
DATASET_MARKERS = ("dataset.json", "manifest.csv")


@dataclass
class Found:
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


def scan_folder(root: Path) -> Found:
    found = Found()
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


class Unreadable(Exception):
    """A file that could not be used; the message goes to the warnings list."""


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise Unreadable(f"{size / 2**20:.0f} MiB is larger than the {MAX_FILE_BYTES // 2**20} MiB limit")


def read_json(path: Path) -> Any:
    try:
        _check_size(path)
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unreadable(f"not readable JSON ({exc})") from exc


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        _check_size(path)
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Unreadable(f"not a readable CSV file ({exc})") from exc
    if not fields:
        raise Unreadable("empty CSV file (no header)")
    return fields, rows


def png_data_uri(path: Path) -> tuple[str, bool, int]:
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
                raise Unreadable(f"{im.width} x {im.height} px is too large to embed")
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
    except Unreadable:
        raise
    except Image.UnidentifiedImageError as exc:
        raise Unreadable("not an image file (PIL cannot identify it)") from exc
    except Exception as exc:  # PIL raises many types on damaged files (OSError, SyntaxError, ...)
        raise Unreadable(f"not a readable PNG ({type(exc).__name__}: {exc})") from exc
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), is_mask, width


def number(text: Any) -> float | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(str(text).strip())
    except ValueError:
        return None


__all__ = ["MAX_SIDE", "Found", "Unreadable", "number", "png_data_uri", "read_csv", "read_json", "scan_folder"]
