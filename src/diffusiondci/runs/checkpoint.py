"""Reading a checkpoint folder safely: its format, verifying it, resolving it, loading it.

A checkpoint is a folder::

    model.safetensors     model weights (safetensors: no code can run while loading)
    ema.safetensors       EMA weights (optional)
    train_state.pt        optimizer / scheduler / sampler position / RNG states / step, written by
                          ``torch.save`` from plain tensors, numbers, strings, lists and dicts only
                          and read back with ``torch.load(..., weights_only=True)``
    meta.json             format tag, step, and a SHA-256 + size for every file (written last)

Checkpoints are written atomically by :mod:`diffusiondci.train.checkpoint`: a crash leaves either
the previous checkpoint or the new one complete, and :func:`resolve_checkpoint` recovers the
previous one if the crash fell between the two renames of a save. Corrupted or partial folders are
detected through ``meta.json`` and the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffusiondci.errors import UserInputError

FORMAT = "diffusiondci-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_problem(ckpt_dir: str | Path, check_hashes: bool = True) -> tuple[Path, str] | None:
    """None if ``ckpt_dir`` is a complete checkpoint, else ``(the file at fault, what is wrong)``."""
    path = Path(ckpt_dir)
    meta_path = path / META_FILE
    if not path.is_dir():
        return path, "not a checkpoint folder"
    if not meta_path.is_file():
        return meta_path, "missing (an incomplete checkpoint, or not a checkpoint)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return meta_path, f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return meta_path, f"not a {FORMAT} record"
    try:
        if int(meta.get("version", -1)) > VERSION:
            return meta_path, f"checkpoint version {meta.get('version')} is newer than this toolkit ({VERSION})"
        files = {str(name): (int(info["bytes"]), str(info["sha256"])) for name, info in meta.get("files", {}).items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        return meta_path, "its file list is malformed"
    if MODEL_FILE not in files:
        return meta_path, f"it lists no {MODEL_FILE}"
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file():
            return f, "file missing"
        actual = f.stat().st_size
        if actual < size:
            return f, f"truncated ({actual} of {size} bytes)"
        if actual != size:
            return f, f"{actual} bytes where {META_FILE} records {size}"
        if check_hashes and sha256_file(f) != digest:
            return f, f"corrupted: the contents were altered (SHA-256 differs from {META_FILE})"
    return None


def verify_checkpoint(ckpt_dir: str | Path, check_hashes: bool = True) -> str | None:
    """Return None if ``ckpt_dir`` is a complete checkpoint, else a short reason (naming the file)."""
    problem = checkpoint_problem(ckpt_dir, check_hashes)
    if problem is None:
        return None
    f, reason = problem
    return f"{f.name}: {reason}" if f != Path(ckpt_dir) else reason


def damaged_checkpoint_error(ckpt_dir: str | Path, problem: tuple[Path, str], advice: str) -> UserInputError:
    """The one-line error for an unusable checkpoint: ``<file>: damaged checkpoint: <what>; <advice>``."""
    f, reason = problem
    return UserInputError(f"damaged checkpoint: {reason}; {advice}", f)


def usable_checkpoint(ckpt_dir: str | Path, advice: str, check_hashes: bool = True) -> Path | None:
    """The complete checkpoint at ``ckpt_dir`` (recovering an interrupted save), None when there is
    none at all, and a :class:`UserInputError` naming the damaged file when one is there but unusable
    (truncated, altered, incomplete): a damaged checkpoint is never mistaken for a missing one.
    ``advice`` ends the error message (what the user can do)."""
    path = Path(ckpt_dir)
    resolved = resolve_checkpoint(path)
    if resolved is None:
        if not path.exists():
            return None
        raise damaged_checkpoint_error(path, checkpoint_problem(path, False) or (path, "incomplete"), advice)
    problem = checkpoint_problem(resolved, check_hashes)
    if problem is not None:
        raise damaged_checkpoint_error(resolved, problem, advice)
    return resolved


def find_checkpoint(run_dir: str | Path, checkpoint: str, command: str) -> Path:
    """The verified checkpoint folder a command reads from a run: ``checkpoint`` names a folder under
    ``checkpoints/`` (``best`` falls back to ``latest`` when the run keeps no best; ``latest``,
    ``step_<N>``) or is a path to a checkpoint folder. ``command`` (``train-seg``, ...) is named in
    the advice. A damaged checkpoint is an error naming the file, never taken for a missing one; so
    is a checkpoint of an untrained run (step 0)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    names = [checkpoint, "latest"] if checkpoint == "best" else [checkpoint]
    advice = (f"nothing was loaded; pick another checkpoint with --checkpoint (latest, step_N) or retrain "
              f"with `diffusiondci {command}`")
    for name in names:
        named = root / name
        folder = named if named.exists() or not Path(name).is_dir() else Path(name)
        found = usable_checkpoint(folder, advice)
        if found is None:
            continue
        try:
            step = json.loads((found / META_FILE).read_text(encoding="utf-8")).get("step")
        except (OSError, ValueError):
            step = None
        if step == 0:
            raise UserInputError(f"the run was never trained (checkpoint of step 0); train it with "
                                 f"`diffusiondci {command} --resume --steps N`", found)
        return found
    if checkpoint in ("best", "latest"):
        raise UserInputError(f"no checkpoint in this run yet; train (or resume) it first with "
                             f"`diffusiondci {command}`", run_dir)
    have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    raise UserInputError(f"no checkpoint {checkpoint!r} in this run (it has: {', '.join(have) or 'none'})", run_dir)


def resolve_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The usable checkpoint at ``ckpt_dir``, recovering an interrupted swap; None if there is none.

    If ``ckpt_dir`` is missing or incomplete but a complete ``.<name>.old-*`` sibling exists (a
    crash between the two renames of a save), that one is moved back into place.
    """
    path = Path(ckpt_dir)
    if path.exists() and verify_checkpoint(path, check_hashes=False) is None:
        return path
    if not path.parent.is_dir():
        return None
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if verify_checkpoint(old, check_hashes=False) is None:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            os.replace(old, path)
            return path
    return None


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU)."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    train_state: dict[str, Any] = field(default_factory=dict)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU; a damaged file is a :class:`UserInputError`."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"cannot read safetensors weights ({first[:200]}); the file is corrupted or not a safetensors file",
            path,
        ) from None


def load_train_state(path: Path) -> dict[str, Any]:
    """``train_state.pt`` read with ``torch.load(weights_only=True)``: plain data only.

    A file holding any other Python object (a pickle payload could run code) is refused with a
    one-line :class:`UserInputError` naming the file; PyTorch's long message (which suggests
    ``weights_only=False``, exactly what must not be done with an untrusted file) is not shown.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the restricted unpickler met something other than plain data
        raise UserInputError(
            "refused to load: the file holds Python objects, not plain training state, and loading it "
            "could run code; nothing was loaded; use a checkpoint written by this toolkit", path,
        ) from None
    except Exception as exc:  # not a torch file at all, truncated zip, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"unreadable training state ({first[:200]}); use another checkpoint folder",
                             path) from None
    if not isinstance(state, dict):
        raise UserInputError("not a training state (expected a mapping); use another checkpoint folder", path)
    return state


def load_checkpoint(ckpt_dir: str | Path, check_hashes: bool = True) -> Checkpoint:
    """Load and verify a checkpoint folder without unpickling arbitrary objects."""
    path = Path(ckpt_dir)
    problem = checkpoint_problem(path, check_hashes=check_hashes)
    if problem is not None:
        raise damaged_checkpoint_error(path, problem, "use another checkpoint folder")
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    model_state = load_safetensors(path / MODEL_FILE)
    ema_state = load_safetensors(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
    train_state: dict[str, Any] = {}
    if (path / STATE_FILE).is_file():
        train_state = load_train_state(path / STATE_FILE)
    return Checkpoint(path=path, meta=meta, model_state=model_state, ema_state=ema_state, train_state=train_state)
