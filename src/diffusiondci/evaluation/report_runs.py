"""The report's title block and its folded list of runs (one row per folder with ``config.json``).

Each row names the run's stage, the steps done (from ``metrics.json`` or ``log.csv``) and a short
list of its main settings (raw keys, so the list is folded at the end of the page).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from .report_files import Found, Unreadable, number, read_csv, read_json
from .report_html import MAX_TABLE_ROWS, Builder, details, esc, fmt, table

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
    return ", ".join(f"{k}={fmt(_short(scalars[k]))}" for k in keys[:limit])


def _last_step(log: Path) -> int | None:
    try:
        _, rows = read_csv(log)
    except Unreadable:
        return None
    steps = [v for v in (number(r.get("step")) for r in rows) if v is not None]
    return int(max(steps)) if steps else None


def _run_row(b: Builder, run: Path) -> list[Any]:
    try:
        config = read_json(run / "config.json")
        if not isinstance(config, dict):
            raise Unreadable("config.json is not a JSON object")
    except Unreadable as exc:
        b.warn(run / "config.json", exc)
        config = {}
    steps, status = None, None
    if (run / "metrics.json").is_file():
        try:
            m = read_json(run / "metrics.json")
            if isinstance(m, dict) and number(m.get("step")) is not None:
                steps = f"{int(number(m['step']))}"
                if number(m.get("max_steps")) is not None:
                    steps += f" / {int(number(m['max_steps']))}"
                status = m.get("status")
        except Unreadable:
            pass  # reported in the metrics section
    if steps is None and (run / "log.csv").is_file():
        last = _last_step(run / "log.csv")
        steps = str(last) if last is not None else None
    return [b.rel(run), config.get("stage", "—"), steps, status, _key_settings(config)]


def overview_section(b: Builder, found: Found, title: str) -> str:
    """Title and the line saying when and from which folder the page was made."""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<h1>{esc(title)}</h1>"
            f'<p class="meta">Generated {esc(now)} from the folder <code>{esc(b.root)}</code>.</p>')


def runs_section(b: Builder, found: Found) -> str:
    """One row per run: stage, steps done, status and its raw settings, folded."""
    if not found.runs:
        return ""
    rows = [_run_row(b, r) for r in found.runs]
    return details(f"{len(rows)} run folder(s): stage, steps done, status, settings",
                   table(["run folder", "stage", "steps done", "status", "key settings"], rows, limit=MAX_TABLE_ROWS))


__all__ = ["overview_section", "runs_section"]
