"""Reading and writing the JSON record of a run folder (``dsdm.json``, ``segmenter.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusiondci.errors import UserInputError


def read_run_record(run_dir: str | Path, name: str, fmt: str, kind: str, command: str) -> dict[str, Any]:
    """The JSON record ``name`` of a run folder (e.g. ``dsdm.json``), checked to be a dict of format ``fmt``.

    ``kind`` names the run in errors ("DSDM", "segmentation"), ``command`` the command that makes one.
    """
    run_dir = Path(run_dir)
    path = run_dir / name
    if not path.is_file():
        raise UserInputError(f"not a {kind} run (no {name}); train one with `diffusiondci {command}`", run_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"unreadable ({exc}); re-run {command} --resume to rewrite it", path) from exc
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise UserInputError(f"not a {kind} run record (format should be {fmt!r})", path)
    return record


def write_run_record(run_dir: str | Path, name: str, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``run_dir/name`` (sorted, indented JSON) unless the file already holds it.

    The file is replaced through a temporary sibling, so a reader sees the old or the new record.
    """
    path = Path(run_dir) / name
    text = json.dumps(record, indent=2, sort_keys=True)
    if path.is_file() and json.loads(path.read_text()) == json.loads(text):
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path
