"""A run's ``config.json``: written once when the run starts, compared on every resume."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusiondci.data.imageio import write_json_atomic


def canonical_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` as it reads back from JSON (sorted keys, non-JSON values as strings)."""
    return json.loads(json.dumps(dict(config or {}), sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def config_diff(saved: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """The keys (dotted paths) whose values differ, ``key: old -> new``, at most ``limit`` of them."""
    a, b = _flatten(saved), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    parts = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; ... ({len(keys)} keys differ)" if len(keys) > limit else "")


def check_run_folder(run_dir: Path, ckpt_root: Path, config: dict[str, Any], resume: bool) -> str | None:
    """Make ``run_dir`` ready for a run with ``config``; returns None, or why it cannot be used.

    A new run needs a folder without ``config.json`` or checkpoints and writes ``config.json``; a
    resumed run must pass the configuration saved there. ``ckpt_root`` is created.
    """
    cfg_path = run_dir / "config.json"
    has_ckpt = ckpt_root.is_dir() and any(ckpt_root.iterdir())
    if not resume and (cfg_path.exists() or has_ckpt):
        return "folder already holds a run; pass --resume to continue it or choose a new run folder"
    if cfg_path.exists():
        try:
            saved = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            return f"config.json is unreadable ({exc}); fix or remove it"
        if saved != config:
            return (
                "cannot resume: the configuration differs from the run's config.json ("
                + config_diff(saved, config)
                + "); resume with the same settings or start a new run folder"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, config, sort_keys=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return None
