"""Writing training checkpoints atomically (the format and its reading: :mod:`diffusiondci.runs.checkpoint`).

Writes are atomic: everything goes to a hidden temporary sibling folder, each file and the folder
are fsync'ed, and only then is the folder swapped in with two renames (old -> ``.<name>.old-*``,
temp -> name). A crash at any point leaves either the previous checkpoint or the new one
complete; :func:`~diffusiondci.runs.checkpoint.resolve_checkpoint` also recovers the previous one
if the crash fell between the two renames. ``meta.json`` (written last) holds a SHA-256 and a size
for every file, so corrupted or partial folders are detected when loading.

The training state is written by ``torch.save`` from plain tensors, numbers, strings, lists and
dicts only, and checked to load with ``torch.load(..., weights_only=True)`` before it is renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from diffusiondci.runs.checkpoint import EMA_FILE, FORMAT, META_FILE, MODEL_FILE, STATE_FILE, VERSION, sha256_file
from diffusiondci.runs.weights import unwrap_model


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-independent copies of the (unwrapped) model's tensors.

    Copies are needed because safetensors refuses tensors that share storage (tied weights).
    """
    sd = unwrap_model(model).state_dict()
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# atomic folder writes
# --------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace folder ``target`` by the complete folder ``tmp`` (two renames + fsync)."""
    old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _finish(tmp: Path, target: Path, meta: dict[str, Any]) -> None:
    files = {}
    for p in sorted(tmp.iterdir()):
        if p.name != META_FILE:
            _fsync_file(p)
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    meta = {**meta, "format": FORMAT, "version": VERSION, "files": files}
    meta_path = tmp / META_FILE
    with open(meta_path, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    _swap_in(tmp, target)


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint folder (see module docstring); returns its path.

    ``train_state`` must contain only tensors, numbers, strings, None, lists, tuples and dicts
    (what ``torch.load(weights_only=True)`` accepts); this is checked before anything is renamed.
    """
    target = Path(ckpt_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    tmp.mkdir()
    try:
        save_file(model_state, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        if ema_state is not None:
            save_file(ema_state, str(tmp / EMA_FILE), metadata={"format": FORMAT})
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
            torch.load(tmp / STATE_FILE, map_location="cpu", weights_only=True)  # loadable safely?
        _finish(tmp, target, dict(meta or {}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically make ``dst`` a copy of the complete checkpoint ``src`` (hard links when possible;
    files are never modified in place, so sharing them is safe)."""
    src, dst = Path(src), Path(dst)
    tmp = _tmp_name(dst)

    def _link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        _fsync_dir(tmp)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# --------------------------------------------------------------------------------------------
# after a crash
# --------------------------------------------------------------------------------------------


def clean_stale_temporaries(folder: str | Path) -> None:
    """Remove ``.*.tmp-*`` folders left by crashed saves (call only when no save is running)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
