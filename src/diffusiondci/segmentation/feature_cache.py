"""Frozen-DSDM features computed once per image view and kept on disk (issue 17).

The DSDM is frozen, so the features of an image are a fixed function of the image: training
recomputed them at every step for nothing. :class:`FeatureCache` computes them the first time an
image *view* is met and keeps them in a bounded folder of safetensors files; later steps, later
epochs, validation passes and later runs of the same experiment read them back.

What is cached: the outputs of the frozen extractor
(:class:`~diffusiondci.segmentation.features.DiffusionFeatureExtractor`: NULL mask, the view's own
reference embedding, the chosen decoder blocks and timesteps) for one **view** of one image: the
image as stored, moved by one of the eight dihedral transforms ``k``
(:func:`diffusiondci.data.augment.dihedral`). The DSDM sees only such un-jittered views; colour
jitter and scale are the segmenter's augmentation, applied after the features are fetched.

Keys:

* the **settings folder** ``<root>/<settings-hash>/`` is named by the SHA-256 of ``settings.json``:
  a fingerprint of the DSDM's and the reference encoder's weights (every tensor's name, dtype,
  shape and bytes), the extraction settings (blocks, timesteps, noise seed and mode, stored dtype,
  schedule) and the extraction batch size. Other weights or settings give another folder, so stale
  features are never read;
* one **file** per view, ``<settings-hash>/<ab>/<view-hash>.safetensors`` (one tensor per block, in
  the stored dtype), where ``<view-hash>`` is a BLAKE2 hash of the view itself, the very tensor the
  DSDM gets (shape and float32 bytes): the same picture gets the same features whatever dataset,
  split, run or transform it comes from (a synthetic pair has its own), and a cached entry for
  ``dihedral(image, k)`` is by construction the DSDM's view of that transform.

Exactness: on the CPU a batched forward pass gives the same numbers for an image whatever the other
images of the batch are, but not whatever the *batch size* is. Views are therefore always run in
chunks of exactly ``chunk`` images (the last one padded with blank images), whether the cache is
on, off, cold or warm, so a cached feature is bit-identical to a recomputed one and a resumed run
(with the cache kept, emptied or moved) trains exactly like an uninterrupted one.

Size bound: the whole ``root`` (all settings folders) is kept under ``max_bytes``; when a new file
would exceed it, the least recently used files are deleted until 90 % of the bound is left.
Recency is the file's modification time (touched on the first hit of a process), so it survives
runs. Files are written atomically (temporary name, then rename); a missing, unreadable or
mis-shaped file counts as a miss and is recomputed, so several processes (DDP ranks, experiment
runs) may share a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserInputError
from .features import FEATURE_DTYPES, DiffusionFeatureExtractor

__all__ = ["CACHE_FORMAT", "FeatureCache", "image_key", "weights_fingerprint"]

CACHE_FORMAT = "diffusiondci.feature_cache"
CACHE_VERSION = 1
SETTINGS_FILE = "settings.json"


def weights_fingerprint(*modules: nn.Module | None) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) of the modules' state dicts."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        h.update(f"module{i}".encode())
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def image_key(image: torch.Tensor) -> str:
    """BLAKE2 hash of an image tensor ``(C, H, W)`` (shape and float32 bytes)."""
    x = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """``features(views) -> {block: (N, C, h, w)}``, read from disk or computed.

    Args:
        extractor: the frozen feature extractor (its device is where views are computed).
        root: the cache folder; ``None`` computes every time (same numbers, nothing kept).
        max_bytes: bound on the files under ``root``.
        chunk: the fixed batch size of every extractor call (see the module docstring).
    """

    def __init__(self, extractor: DiffusionFeatureExtractor, root: str | Path | None, max_bytes: int,
                 chunk: int = 4) -> None:
        if chunk < 1:
            raise UserInputError(f"seg.feature_batch must be >= 1, got {chunk}")
        self.extractor = extractor
        self.chunk = int(chunk)
        self.max_bytes = int(max_bytes)
        self.dtype = FEATURE_DTYPES[extractor.feature_dtype]
        self.settings: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "weights_sha256": weights_fingerprint(extractor.dsdm, extractor.encoder),
            "extraction": extractor.settings(),
            "chunk": self.chunk,
        }
        text = json.dumps(self.settings, sort_keys=True)
        self.settings_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.stats = {"hits": 0, "misses": 0, "evicted": 0}
        self.root = Path(root) if root is not None else None
        self.folder: Path | None = None
        self._index: dict[Path, list[float]] = {}  # file -> [bytes, last use]
        self._touched: set[Path] = set()
        self._clock = 0.0
        if self.root is not None:
            self.folder = self.root / self.settings_hash
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                if not (self.folder / SETTINGS_FILE).is_file():
                    self._atomic_write_text(self.folder / SETTINGS_FILE, json.dumps(self.settings, indent=2))
            except OSError as exc:
                raise UserInputError(
                    f"cannot write the feature cache ({exc.strerror}); give a writable folder with "
                    "--feature-cache DIR, or --feature-cache off", self.root) from exc
            self._scan()

    # ------------------------------------------------------------------ disk
    @property
    def total_bytes(self) -> int:
        return int(sum(v[0] for v in self._index.values()))

    def _scan(self) -> None:
        assert self.root is not None
        entries = []
        for path in self.root.glob("*/*/*.safetensors"):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, path, st.st_size))
        entries.sort()
        self._index = {p: [float(size), float(i)] for i, (_, p, size) in enumerate(entries)}
        self._clock = float(len(entries))

    def path(self, key: str) -> Path:
        """The file of the view whose :func:`image_key` is ``key``."""
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    @staticmethod
    def _atomic_write_text(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _load(self, path: Path, shapes: dict[int, tuple[int, ...]] | None) -> dict[int, torch.Tensor] | None:
        try:
            raw = load_file(str(path))
        except Exception:  # noqa: BLE001 -- missing (evicted by another process), torn or foreign: a miss
            self._index.pop(path, None)
            return None
        out = {b: raw.get(f"block{b}") for b in self.extractor.blocks}
        if any(t is None or t.dtype != self.dtype for t in out.values()) or (
                shapes is not None and any(tuple(out[b].shape) != shapes[b] for b in out)):
            self._index.pop(path, None)
            return None
        return out  # type: ignore[return-value]

    def _store(self, path: Path, feats: dict[int, torch.Tensor]) -> None:
        tensors = {f"block{b}": f.detach().to("cpu", self.dtype).contiguous() for b, f in feats.items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
            size = path.stat().st_size
        except OSError:
            return  # a full or read-only disk costs speed, never correctness
        self._clock += 1
        self._index[path] = [float(size), self._clock]
        self._touched.add(path)
        self._evict()

    def _evict(self) -> None:
        total = self.total_bytes
        if total <= self.max_bytes:
            return
        target = 0.9 * self.max_bytes
        for path, (size, _) in sorted(self._index.items(), key=lambda kv: kv[1][1]):
            if total <= target:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self._index.pop(path, None)
            self._touched.discard(path)
            total -= size
            self.stats["evicted"] += 1

    def _hit(self, path: Path) -> None:
        self._clock += 1
        entry = self._index.get(path)
        if entry is None:  # written by another process since the scan
            try:
                entry = self._index[path] = [float(path.stat().st_size), 0.0]
            except OSError:
                return
        entry[1] = self._clock
        if path not in self._touched:  # recency for later runs; once per process and file
            self._touched.add(path)
            try:
                os.utime(path)
            except OSError:
                pass

    # ------------------------------------------------------------------ features
    def compute(self, views: torch.Tensor) -> dict[int, torch.Tensor]:
        """The extractor on ``views`` in chunks of exactly ``chunk`` images (see the module docstring)."""
        n = views.shape[0]
        parts: list[dict[int, torch.Tensor]] = []
        for start in range(0, n, self.chunk):
            part = views[start:start + self.chunk]
            m = part.shape[0]
            if m < self.chunk:
                part = torch.cat([part, part.new_zeros((self.chunk - m, *part.shape[1:]))])
            out = self.extractor(part)
            parts.append({b: f[:m] for b, f in out.items()})
        return {b: torch.cat([p[b] for p in parts]) for b in self.extractor.blocks}

    def features(self, views: torch.Tensor, keys: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
        """Features of each view ``views[i]`` (the DSDM's input: e.g. ``dihedral(image, k)``, never
        jittered), float32 on ``views``' device. ``keys`` (default :func:`image_key` of each view)
        name the views in the cache; a view is run through the DSDM only on a miss."""
        n = views.shape[0]
        keys = [image_key(v) for v in views] if keys is None else list(keys)
        if len(keys) != n:
            raise ValueError("one key per view")
        found: list[dict[int, torch.Tensor] | None] = [None] * n
        if self.folder is not None:
            shapes = self._shapes(views.shape[-2:])
            for i, key in enumerate(keys):
                path = self.path(key)
                if path in self._index or path.is_file():
                    found[i] = self._load(path, shapes)
                    if found[i] is not None:
                        self._hit(path)
        missing = [i for i in range(n) if found[i] is None]
        self.stats["hits"] += n - len(missing)
        self.stats["misses"] += len(missing)
        if missing:
            fresh = self.compute(views[missing])
            for j, i in enumerate(missing):
                one = {b: fresh[b][j] for b in fresh}
                found[i] = one
                if self.folder is not None:
                    self._store(self.path(keys[i]), one)
        dev = views.device
        return {b: torch.stack([f[b].to(dev, torch.float32) for f in found])  # type: ignore[index]
                for b in self.extractor.blocks}

    def _shapes(self, hw: Sequence[int]) -> dict[int, tuple[int, ...]] | None:
        ex = self.extractor
        if tuple(int(s) for s in hw) != (ex.image_size, ex.image_size):
            return None
        shapes = ex.dsdm.decoder_feature_shapes
        return {b: (shapes[b][0] * len(ex.timesteps), shapes[b][1], shapes[b][2]) for b in ex.blocks}

    def hit_rate(self) -> float:
        total = self.stats["hits"] + self.stats["misses"]
        return self.stats["hits"] / total if total else 0.0
