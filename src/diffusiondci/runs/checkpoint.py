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


def verify_checkpoint(ckpt_dir: str | Path, check_hashes: bool = True) -> str | None:
    """Return None if ``ckpt_dir`` is a complete checkpoint, else a short reason."""
    path = Path(ckpt_dir)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return f"no {META_FILE} (incomplete or not a checkpoint)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {META_FILE}: {exc}"
    if meta.get("format") != FORMAT:
        return f"{META_FILE} is not a {FORMAT}"
    if int(meta.get("version", -1)) > VERSION:
        return f"checkpoint version {meta.get('version')} is newer than this toolkit ({VERSION})"
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['bytes']}"
        if check_hashes and sha256_file(f) != info["sha256"]:
            return f"{name} is corrupted (SHA-256 mismatch)"
    return None


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
        raise UserInputError(
            f"cannot read safetensors weights ({exc}); the file is corrupted or not a safetensors file",
            path,
        ) from exc


def load_checkpoint(ckpt_dir: str | Path, check_hashes: bool = True) -> Checkpoint:
    """Load and verify a checkpoint folder without unpickling arbitrary objects."""
    path = Path(ckpt_dir)
    reason = verify_checkpoint(path, check_hashes=check_hashes)
    if reason is not None:
        raise UserInputError(f"not a usable checkpoint: {reason}; pick another checkpoint folder", path)
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    model_state = load_safetensors(path / MODEL_FILE)
    ema_state = load_safetensors(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
    train_state: dict[str, Any] = {}
    if (path / STATE_FILE).is_file():
        try:
            train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # the restricted unpickler rejects anything but plain data
            raise UserInputError(
                f"{STATE_FILE} cannot be loaded safely ({exc}); use a checkpoint written by this toolkit",
                path / STATE_FILE,
            ) from exc
    return Checkpoint(path=path, meta=meta, model_state=model_state, ema_state=ema_state, train_state=train_state)
