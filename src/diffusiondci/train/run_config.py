"""A run folder before training starts: what it may hold, and its ``config.json``.

A new run needs a new or empty folder (never a dataset, another kind of run or unrelated files); a
resumed run needs a run of the same kind, a usable ``checkpoints/latest`` (a damaged one is an
error naming the file, never a silent fresh start) and the configuration saved in ``config.json``
(written once when the run starts, compared on every resume). All checks run before anything is
written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusiondci.data.imageio import write_json_atomic
from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt


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


#: the command that makes each kind of run (``config.json``'s ``stage``)
STAGE_COMMANDS = {"encoder": "train-encoder", "dsdm": "train-dsdm", "seg": "train-seg"}

#: files that say what else a folder is (checked in this order)
_FOLDER_KINDS = (
    ("dataset.json", "a patch dataset"),
    ("manifest.csv", "a patch dataset"),
    ("generation.json", "the output of `diffusiondci sample`"),
    ("probe.csv", "the output of `diffusiondci probe`"),
    ("experiment.json", "an experiment folder"),
)


def _run_name(stage: Any) -> str:
    return f"a {STAGE_COMMANDS[stage]} run" if stage in STAGE_COMMANDS else "a training run"


def describe_folder(folder: Path) -> str:
    """What a non-empty folder that is not a run holds, in a few words (for error messages)."""
    for name, what in _FOLDER_KINDS:
        if (folder / name).exists():
            return f"{what} ({name})"
    if any(folder.glob("*_areas.json")):
        return "the output of `diffusiondci segment`"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} other file{'s' if len(names) != 1 else ''} ({shown})"


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _checkpoint_error(ckpt_root: Path, recover: bool) -> UserInputError | None:
    """Why the run's checkpoints cannot be resumed from (None: ``latest`` is usable, or the run has
    no checkpoint at all yet). A damaged ``latest`` is an error, never a fresh start. ``recover``
    moves back a complete copy left by a save that crashed between its two renames; without it
    nothing is written (such a copy just counts as usable)."""
    advice = ("nothing was changed; put a good checkpoint there (e.g. a copy of checkpoints/step_N) "
              "or start a new run folder")
    latest = ckpt_root / "latest"
    if recover:
        try:
            if run_ckpt.usable_checkpoint(latest, advice) is not None:
                return None
        except UserInputError as exc:
            return exc
    elif any(run_ckpt.verify_checkpoint(old, check_hashes=False) is None for old in ckpt_root.glob(".latest.old-*")):
        if not latest.exists() or run_ckpt.verify_checkpoint(latest, check_hashes=False) is not None:
            return None  # recovered when the trainer starts
    if latest.exists():
        problem = run_ckpt.checkpoint_problem(latest)
        return run_ckpt.damaged_checkpoint_error(latest, problem, advice) if problem is not None else None
    others = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if others:
        return UserInputError(
            f"cannot resume: checkpoints/latest is missing but the run has {', '.join(others)}; nothing was "
            "changed; copy the checkpoint to resume from to checkpoints/latest or start a new run folder",
            latest,
        )
    return None


def run_folder_error(run_dir: str | Path, stage: str | None, resume: bool, recover: bool = False
                     ) -> UserInputError | None:
    """Why ``run_dir`` cannot take a new (``resume`` False) or resumed run of kind ``stage``
    (``config.json``'s ``stage``: encoder, dsdm, seg); None if it can. Reads only (unless ``recover``,
    see :func:`_checkpoint_error`), so the training commands call it before any work.

    A new run needs a missing or empty folder (hidden files aside); a folder holding anything else
    (a dataset, another kind of run, other files) is refused. A resumed run needs a run of the same
    kind there (``config.json``) and a usable ``checkpoints/latest`` (or no checkpoint at all yet:
    a run stopped before its first save starts over).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    ckpt_root = run_dir / "checkpoints"
    kind = _run_name(stage)
    if run_dir.exists() and not run_dir.is_dir():
        return UserInputError(f"is a file, not a run folder; choose a new folder for {kind}", run_dir)
    if not cfg_path.is_file():
        if run_dir.is_dir() and _visible_entries(run_dir):
            return UserInputError(f"holds {describe_folder(run_dir)}, not {kind}; choose a new or empty folder",
                                  run_dir)
        if resume:
            return UserInputError(
                f"no run to resume here (no config.json); leave out --resume to start a new "
                f"{kind[2:]} in this folder", run_dir)
        return None
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return UserInputError(f"unreadable ({first}); fix or remove it, or choose a new run folder", cfg_path)
    if not isinstance(saved, dict):
        return UserInputError("not a run configuration; choose a new run folder", cfg_path)
    if stage is not None and saved.get("stage") != stage:
        return UserInputError(f"holds {_run_name(saved.get('stage'))}, not {kind}; choose a new or empty folder",
                              run_dir)
    if not resume:
        return UserInputError("folder already holds a run; pass --resume to continue it or choose a new run folder",
                              run_dir)
    if ckpt_root.is_dir():
        return _checkpoint_error(ckpt_root, recover)
    return None


def preflight_run_folder(run_dir: str | Path, stage: str, resume: bool) -> None:
    """Raise :func:`run_folder_error`'s error, if any (read-only: call it before loading data).

    Only the first process of a ``torchrun`` job checks here (the others could see the folder after
    it has started writing); the :class:`~.loop.Trainer` checks again and stops every process."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    error = run_folder_error(run_dir, stage, resume)
    if error is not None:
        raise error


def check_run_folder(run_dir: Path, ckpt_root: Path, config: dict[str, Any], resume: bool) -> UserInputError | None:
    """Make ``run_dir`` ready for a run with ``config``; returns None, or the error that stops it.

    The folder checks of :func:`run_folder_error` (kind, emptiness, a usable checkpoint to resume
    from), then a resumed run must pass the configuration saved in ``config.json``. Nothing is
    written unless the folder can be used; then ``config.json`` (new runs) and ``ckpt_root`` are created.
    """
    error = run_folder_error(run_dir, config.get("stage"), resume, recover=True)
    if error is not None:
        return error
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
        if saved != config:
            return UserInputError(
                "cannot resume: the configuration differs from the run's config.json ("
                + config_diff(saved, config)
                + "); resume with the same settings or start a new run folder",
                run_dir,
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, config, sort_keys=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return None
