"""Safe, atomic training checkpoints.

A checkpoint is a folder::

    model.safetensors     model weights (safetensors: no code can run while loading)
    ema.safetensors       EMA weights (optional)
    train_state.pt        optimizer / scheduler / sampler position / RNG states / step, written by
                          ``torch.save`` from plain tensors, numbers, strings, lists and dicts only
                          and read back with ``torch.load(..., weights_only=True)``
    meta.json             format tag, step, and a SHA-256 + size for every file (written last)

Writes are atomic: everything goes to a hidden temporary sibling folder, each file and the folder
are fsync'ed, and only then is the folder swapped in with two renames (old -> ``.<name>.old-*``,
temp -> name). A crash at any point leaves either the previous checkpoint or the new one
complete; :func:`resolve_checkpoint` also recovers the previous one if the crash fell between the
two renames. Corrupted or partial folders are detected through ``meta.json`` and the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffusiondci.errors import UserInputError

FORMAT = "diffusiondci-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-independent copies of the (unwrapped) model's tensors.

    Copies are needed because safetensors refuses tensors that share storage (tied weights).
    """
    sd = unwrap_model(model).state_dict()
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# RNG states as plain tensors
# --------------------------------------------------------------------------------------------


def _generator_state(gen: Any) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # bit-generator states hold 128-bit integers: JSON keeps them exact
        return {"kind": "numpy", "state": json.dumps(gen.bit_generator.state)}
    raise TypeError(f"cannot checkpoint a generator of type {type(gen).__name__}")


def _set_generator_state(gen: Any, state: dict[str, Any]) -> None:
    if isinstance(gen, torch.Generator) and state["kind"] == "torch":
        gen.set_state(state["state"])
    elif isinstance(gen, np.random.Generator) and state["kind"] == "numpy":
        gen.bit_generator.state = json.loads(state["state"])
    else:
        raise TypeError(f"generator {type(gen).__name__} does not match saved kind {state['kind']}")


def capture_rng_state(generators: dict[str, Any] | None = None) -> dict[str, Any]:
    """Python ``random``, NumPy global, torch CPU, CUDA (if available) and registered generators."""
    version, internal, gauss_next = random.getstate()
    _name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: _generator_state(g) for k, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, Any] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if torch.cuda.is_available() and cuda_states:
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # fewer/more visible GPUs than when saved: restore the current device only
            idx = torch.cuda.current_device()
            torch.cuda.set_rng_state(cuda_states[min(idx, len(cuda_states) - 1)])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint has no state for registered generator {name!r}")
        _set_generator_state(gen, saved[name])


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
            files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
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
# reading
# --------------------------------------------------------------------------------------------


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
        if check_hashes and _sha256(f) != info["sha256"]:
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


def clean_stale_temporaries(folder: str | Path) -> None:
    """Remove ``.*.tmp-*`` folders left by crashed saves (call only when no save is running)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU)."""

    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    train_state: dict[str, Any] = field(default_factory=dict)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
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
    model_state = _load_safetensors(path / MODEL_FILE)
    ema_state = _load_safetensors(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
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


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def _strip_module_prefix(state: dict[str, torch.Tensor], target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept weights saved from a DDP-wrapped model (keys prefixed ``module.``)."""
    if state and target and all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in target
    ):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True
) -> LoadReport:
    """Compare ``state`` with ``model``'s keys and shapes; raise UserInputError listing problems.

    Shape mismatches are always an error; missing / unexpected keys only when ``strict``.
    """
    target = unwrap_model(model).state_dict()
    state = _strip_module_prefix(state, target)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if tuple(state[k].shape) != tuple(target[k].shape)
    )
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys {_short(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches {_short(mismatched, 5)}")
    if problems:
        raise UserInputError(
            "weights do not fit this model (" + "; ".join(problems) + "); use a checkpoint trained "
            "with the same architecture and preset",
            path,
        )
    return LoadReport(missing=missing, unexpected=unexpected)


def load_weights_safetensors(
    model: nn.Module, path: str | Path, strict: bool = True, ema: bool = False
) -> LoadReport:
    """Load safetensors weights into ``model`` after checking keys and shapes.

    ``path`` is a ``.safetensors`` file or a checkpoint folder (then ``model.safetensors``, or
    ``ema.safetensors`` when ``ema`` is True). A file from another architecture or preset raises
    :class:`UserInputError` listing missing, unexpected and shape-mismatched keys.
    """
    path = Path(path)
    if path.is_dir():
        resolved = resolve_checkpoint(path)
        folder = resolved if resolved is not None else path
        path = folder / (EMA_FILE if ema else MODEL_FILE)
        if ema and not path.is_file():
            raise UserInputError("checkpoint has no EMA weights; load model.safetensors instead", path)
    if not path.is_file():
        raise UserInputError("weights file not found; pass a .safetensors file or a checkpoint folder", path)
    state = _load_safetensors(path)
    report = check_state_dict(model, state, path, strict=strict)
    target = unwrap_model(model)
    target.load_state_dict(_strip_module_prefix(state, target.state_dict()), strict=strict)
    return report


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
