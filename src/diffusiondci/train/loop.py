"""Generic, exactly-resumable training loop shared by every stage (SimCLR, DSDM, segmenter).

A stage supplies a model, an optimizer, a map-style dataset and a ``step_fn`` that returns the loss
(e.g. the DSDM hybrid loss, paper Eq. 9, or the segmenter's cross-entropy); :class:`Trainer` does
everything else:

* a run folder ``run_dir/`` with ``config.json`` (written once, checked on resume), ``log.csv``,
  TensorBoard events under ``tb/``, ``checkpoints/{latest,best,step_<N>}/``, ``samples/`` and a
  final ``metrics.json``;
* seeded, resumable data order (:class:`ResumableSampler`: one permutation per epoch from
  ``(seed, epoch)``, each DDP rank takes its shard, the position within the epoch is saved);
* zero_grad / backward / gradient clipping / optimizer and LR-scheduler step / EMA update;
* a loss guard: a NaN/inf loss or gradient norm stops the run with :class:`TrainingDiverged`
  before the weights are touched, and the last good checkpoint is never overwritten;
* atomic checkpoints (:mod:`diffusiondci.train.checkpoint`, read back by :mod:`diffusiondci.runs.checkpoint`) holding weights, EMA weights,
  optimizer, scheduler, sampler position and every RNG state, so that a killed run resumed with
  ``resume=True`` produces bit-identical weights to an uninterrupted run (on CPU; on GPU up to
  the determinism of the kernels, see ``deterministic``);
* DistributedDataParallel when launched by ``torchrun`` (see :mod:`.distributed`); only rank 0
  writes files, every rank loads on resume.

Exact resume covers randomness drawn in the main process (dropout, noise, timesteps, augmentation
on the batch inside ``step_fn``) and in registered generators. Randomness drawn inside DataLoader
*workers* (``num_workers > 0``) is seeded per epoch but not resumed mid-epoch; derive it from the
sample index if it must be exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusiondci.data.imageio import write_json_atomic
from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt
from diffusiondci.runs.csv_log import CsvLog
from diffusiondci.runs.seeds import derive_seed, seed_everything
from diffusiondci.runs.weights import check_state_dict, unwrap_model
from diffusiondci.train import checkpoint as ckpt
from diffusiondci.train import distributed as dist_utils


class TrainingDiverged(UserInputError):
    """The loss (or gradient norm) became NaN/inf; the run stopped and kept its last good checkpoint."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------


class ResumableSampler(Sampler[int]):
    """Seeded epoch-based sampler that can start in the middle of an epoch.

    Epoch ``e`` uses the permutation ``randperm(n)`` drawn from a generator seeded with
    ``(seed, e)``; like :class:`torch.utils.data.DistributedSampler` (``drop_last=True``) the
    permutation is cut to a multiple of ``world_size`` and rank ``r`` takes ``perm[r::world_size]``;
    the shard is cut to whole batches (training uses ``drop_last``). ``set_epoch(e, start_batch)``
    selects the epoch and the number of batches already consumed, so resuming skips exactly them
    without touching the dataset.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = self.num_samples // self.world_size
        self.batches_per_epoch = self.per_rank // self.batch_size
        if self.batches_per_epoch < 1:
            raise UserInputError(
                f"dataset has {self.num_samples} samples, fewer than one batch of {self.batch_size} "
                f"per process x {self.world_size} processes; add data or lower the batch size"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank visits in ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        shard = perm[:total][self.rank :: self.world_size]
        return shard[: self.batches_per_epoch * self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (per-process ``batch_size``, ``drop_last``)."""
    return (num_samples // world_size) // batch_size


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging, as in DDPM/ADM).

    After every optimizer step ``theta_ema <- d * theta_ema + (1 - d) * theta`` for floating-point
    parameters; buffers (e.g. BatchNorm statistics) are copied. With ``warmup`` the decay is
    ``min(d, (1 + n) / (10 + n))`` after ``n`` updates (as in diffusers' EMAModel), which helps
    short runs. ``module`` is a frozen copy kept in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise UserInputError(f"ema_decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = unwrap_model(model)
        for e, p in zip(self.module.parameters(), src.parameters(), strict=True):
            if e.is_floating_point():
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p)
        for e, b in zip(self.module.buffers(), src.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_rng(generators: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Run a block (validation, sampling) without disturbing the training RNG streams."""
    state = ckpt.capture_rng_state(dict(generators or {}))
    try:
        yield
    finally:
        ckpt.restore_rng_state(state, dict(generators or {}))


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors inside (nested) tuples / lists / dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return type(obj)({k: move_to_device(v, device, non_blocking) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, non_blocking) for v in obj)
    return obj


def _canonical(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config or {}), sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def _config_diff(saved: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    a, b = _flatten(saved), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    parts = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; ... ({len(keys)} keys differ)" if len(keys) > limit else "")


def _scalar(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean().item())
    return float(v)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

StepFn = Callable[[nn.Module, Any, int], Mapping[str, Any]]
ValFn = Callable[[nn.Module, int], Mapping[str, Any]]
SampleFn = Callable[[nn.Module, int, Path], Any]


class Trainer:
    """Train ``model`` with ``step_fn`` for ``max_steps`` optimizer steps in ``run_dir``.

    ``step_fn(model, batch, step) -> {"loss": Tensor, **scalars}``: ``model`` is the DDP-wrapped
    model in distributed runs (call it, use :func:`unwrap_model` for attributes), ``batch`` is
    already on the device, ``step`` is the number of optimizer steps done so far. Extra scalars
    (tensors or floats) are averaged over ``log_every`` steps and over ranks, then logged.

    ``val_fn(model, step) -> {name: float}`` runs every ``val_every`` steps on every rank (in eval
    mode, under ``no_grad``, with RNG streams preserved; default every ``ckpt_every``) on the EMA
    model when there is one and ``val_use_ema``; rank 0's values are logged as ``val_<name>`` and ``best_key``/``best_mode``
    ("min"/"max") select ``checkpoints/best/``. ``sample_fn(model, step, out_dir)`` runs on rank 0
    every ``sample_every`` steps with the EMA model (if any) and ``run_dir/samples/step_<N>/``.

    Every ``ckpt_every`` steps and at the end ``checkpoints/latest/`` is replaced atomically
    (``keep_last`` > 0 also keeps the last k as ``checkpoints/step_<N>/``). In multi-node runs
    ``run_dir`` must be on a filesystem every rank can read (all ranks load on resume).

    ``batch_size`` is per process. ``config`` is the resolved run configuration: it is written to
    ``config.json`` once and a resumed run must pass an identical one. ``generators`` (torch or
    NumPy generators) and ``extra_state`` (objects with ``state_dict``/``load_state_dict`` holding
    plain data) are saved in every checkpoint and restored on resume; more can be added with
    :meth:`register_generator` / :meth:`register_state` before :meth:`fit`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        batch_size: int,
        step_fn: StepFn,
        max_steps: int,
        *,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        scheduler: Any | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        log_every: int = 50,
        ckpt_every: int = 1000,
        keep_last: int = 0,
        val_fn: ValFn | None = None,
        val_every: int | None = None,
        best_key: str | None = None,
        best_mode: str = "min",
        val_use_ema: bool = True,
        sample_fn: SampleFn | None = None,
        sample_every: int | None = None,
        resume: bool = False,
        grad_clip: float | None = None,
        device: str | torch.device | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        autocast: str | None = None,
        progress: bool = True,
        generators: Mapping[str, Any] | None = None,
        extra_state: Mapping[str, Stateful] | None = None,
        find_unused_parameters: bool = False,
        deterministic: bool = False,
    ):
        if max_steps < 0 or log_every < 1 or ckpt_every < 1:
            raise UserInputError("max_steps must be >= 0 and log_every, ckpt_every >= 1")
        if best_mode not in ("min", "max"):
            raise UserInputError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if autocast not in (None, "bf16"):
            raise UserInputError(f"autocast must be None or 'bf16', got {autocast!r}")
        self.run_dir = Path(run_dir)
        self.dist = dist_utils.init_distributed(device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_fn, self.val_fn, self.sample_fn = step_fn, val_fn, sample_fn
        self.max_steps, self.seed, self.batch_size = int(max_steps), int(seed), int(batch_size)
        self.log_every, self.ckpt_every, self.keep_last = int(log_every), int(ckpt_every), int(keep_last)
        self.val_every = int(val_every) if val_every else (self.ckpt_every if val_fn else None)
        self.sample_every = int(sample_every) if sample_every else None
        self.best_key, self.best_mode, self.val_use_ema = best_key, best_mode, val_use_ema
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.autocast = autocast
        self.progress = progress
        self.resume = resume
        self.generators: dict[str, Any] = dict(generators or {})
        self.extra_state: dict[str, Stateful] = dict(extra_state or {})
        self.config = _canonical(config)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        self.ckpt_root = self.run_dir / "checkpoints"
        self.latest_dir = self.ckpt_root / "latest"
        self.best_dir = self.ckpt_root / "best"
        self._prepare_run_dir()

        seed_everything(self.seed + self.dist.rank)
        self.model = unwrap_model(model).to(self.device)
        self.ema = EMA(self.model, ema_decay, ema_warmup) if ema_decay is not None else None
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )

        self.sampler = ResumableSampler(
            len(dataset),  # type: ignore[arg-type]
            self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self._loader_gen = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            generator=self._loader_gen,  # keeps DataLoader's seed draw off the global RNG
            persistent_workers=num_workers > 0,
        )
        self.step = 0
        self.epoch = 0
        self.position = 0  # batches of the current epoch already consumed
        self.elapsed = 0.0
        self.best: dict[str, Any] = {"key": best_key, "mode": best_mode, "value": None, "step": None}
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.status = "created"
        self._restored = False
        self._last_saved_step: int | None = None

    # ---------------------------------------------------------------- registration
    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def ema_model(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def register_generator(self, name: str, generator: torch.Generator | np.random.Generator) -> None:
        """Save/restore ``generator`` with the checkpoints (call before :meth:`fit`)."""
        self._check_not_started()
        self.generators[name] = generator

    def register_state(self, name: str, obj: Stateful) -> None:
        """Save/restore ``obj.state_dict()`` (plain tensors / numbers / containers) with checkpoints."""
        self._check_not_started()
        self.extra_state[name] = obj

    def _check_not_started(self) -> None:
        if self._restored:
            raise RuntimeError("register generators and state before calling fit()")

    # ---------------------------------------------------------------- run folder
    def _prepare_run_dir(self) -> None:
        error: str | None = None
        if self.is_main:
            error = self._check_run_dir()
        error = dist_utils.broadcast_object(error)
        if error is not None:
            raise UserInputError(error, self.run_dir)
        dist_utils.barrier()

    def _check_run_dir(self) -> str | None:
        cfg_path = self.run_dir / "config.json"
        has_ckpt = self.ckpt_root.is_dir() and any(self.ckpt_root.iterdir())
        if not self.resume and (cfg_path.exists() or has_ckpt):
            return "folder already holds a run; pass --resume to continue it or choose a new run folder"
        if cfg_path.exists():
            try:
                saved = json.loads(cfg_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                return f"config.json is unreadable ({exc}); fix or remove it"
            if saved != self.config:
                return (
                    "cannot resume: the configuration differs from the run's config.json ("
                    + _config_diff(saved, self.config)
                    + "); resume with the same settings or start a new run folder"
                )
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cfg_path, self.config, sort_keys=True)
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        return None

    # ---------------------------------------------------------------- checkpoints
    def _train_state(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "sampler": self.sampler.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates} if self.ema else None,
            "rng": rng_states,
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "best": dict(self.best),
            "elapsed": self.elapsed,
            "world_size": self.dist.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "last_train": dict(self.last_train),
            "last_val": dict(self.last_val),
        }

    def save(self, *, latest: bool = True, best: bool = False, keep: bool = False) -> None:
        """Write the current state to ``latest`` (and ``best`` / ``step_<N>``); all ranks must call."""
        rng_states = dist_utils.all_gather_object(ckpt.capture_rng_state(self.generators))
        if self.is_main:
            targets = ([self.latest_dir] if latest else []) + ([self.best_dir] if best else [])
            if keep:
                targets.append(self.ckpt_root / f"step_{self.step}")
            first, rest = targets[0], targets[1:]
            ckpt.save_checkpoint(
                first,
                model_state=ckpt.state_dict_for_saving(self.model),
                ema_state=ckpt.state_dict_for_saving(self.ema.module) if self.ema else None,
                train_state=self._train_state(rng_states),
                meta={"step": self.step, "epoch": self.epoch, "torch": torch.__version__},
            )
            for t in rest:
                ckpt.copy_checkpoint(first, t)
            if keep and self.keep_last > 0:
                kept = sorted(
                    (p for p in self.ckpt_root.glob("step_*") if p.name[5:].isdigit()),
                    key=lambda p: int(p.name[5:]),
                )
                for old in kept[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        if latest:
            self._last_saved_step = self.step
        dist_utils.barrier()

    def _restore(self) -> None:
        self._restored = True
        if not self.resume:
            return
        found: str | None = None
        if self.is_main:
            ckpt.clean_stale_temporaries(self.ckpt_root)
            path = run_ckpt.resolve_checkpoint(self.latest_dir)
            found = str(path) if path is not None else None
        found = dist_utils.broadcast_object(found)
        if found is None:
            if self.is_main:
                warnings.warn(f"{self.run_dir}: no checkpoint to resume from; starting from step 0", stacklevel=3)
            return
        c = run_ckpt.load_checkpoint(found)
        ts = c.train_state
        for name, want in (("seed", self.seed), ("batch_size", self.batch_size)):
            if ts.get(name) != want:
                raise UserInputError(
                    f"checkpoint was trained with {name}={ts.get(name)}, this run uses {want}; "
                    "resume with the same value or start a new run folder",
                    found,
                )
        check_state_dict(self.model, c.model_state, Path(found) / run_ckpt.MODEL_FILE)
        self.model.load_state_dict(c.model_state)
        if self.ema is not None:
            if c.ema_state is None or ts.get("ema") is None:
                raise UserInputError("checkpoint has no EMA weights but this run uses EMA", found)
            self.ema.module.load_state_dict(c.ema_state)
            self.ema.num_updates = int(ts["ema"]["num_updates"])
        self.optimizer.load_state_dict(ts["optimizer"])
        if self.scheduler is not None and ts.get("scheduler") is not None:
            self.scheduler.load_state_dict(ts["scheduler"])
        for name, obj in self.extra_state.items():
            if name not in ts.get("extra", {}):
                raise UserInputError(f"checkpoint has no saved state {name!r}", found)
            obj.load_state_dict(ts["extra"][name])
        rngs = ts["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.restore_rng_state(rngs[self.dist.rank], self.generators)
        else:
            warnings.warn(
                f"checkpoint was written by {len(rngs)} processes, now {self.dist.world_size}: data "
                "order and random streams will differ from an uninterrupted run",
                stacklevel=3,
            )
            ckpt.restore_rng_state(rngs[0], self.generators)
            seed_everything(derive_seed(self.seed, self.dist.rank, int(ts["step"])))
        self.step, self.epoch, self.position = int(ts["step"]), int(ts["epoch"]), int(ts["position"])
        if self.position > self.sampler.batches_per_epoch or len(rngs) != self.dist.world_size:
            # the per-rank shard size changed: restart the epoch
            self.position = min(self.position, self.sampler.batches_per_epoch)
        self.best = dict(ts.get("best") or self.best)
        self.best.update(key=self.best_key, mode=self.best_mode)
        self.elapsed = float(ts.get("elapsed", 0.0))
        self.last_train = dict(ts.get("last_train") or {})
        self.last_val = dict(ts.get("last_val") or {})
        self._last_saved_step = self.step

    # ---------------------------------------------------------------- one step
    def _diverged(self, what: str) -> None:
        kept = run_ckpt.resolve_checkpoint(self.latest_dir) if self.is_main else None
        where = f"last good checkpoint {kept} (step {self._last_saved_step}) was kept" if kept else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged at step {self.step}: {what}; stopped without saving, {where}; "
            "lower the learning rate, set grad_clip or check the data, then rerun with --resume",
            self.run_dir,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, batch: Any) -> dict[str, float]:
        batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.step_fn(self.train_model, batch, self.step)
        if not isinstance(out, Mapping) or "loss" not in out:
            raise TypeError("step_fn must return a dict with a 'loss' tensor")
        loss = out["loss"]
        loss_value = float(loss.detach().float().item())
        bad = not math.isfinite(loss_value)
        if self.dist.distributed:  # every rank must agree before the collective backward
            bad = dist_utils.all_reduce_max(float(bad)) > 0
        if bad:
            self._diverged(f"loss is {loss_value}" if not math.isfinite(loss_value) else "loss is not finite on another rank")
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        gn = float(grad_norm.item())
        if not math.isfinite(gn):  # identical on all ranks: DDP averaged the gradients
            self._diverged(f"gradient norm is {gn}")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        metrics = {"loss": loss_value}
        for k, v in out.items():
            if k != "loss":
                metrics[k] = _scalar(v)
        metrics["grad_norm"] = gn
        return metrics

    # ---------------------------------------------------------------- val / samples
    def _eval_model(self, use_ema: bool) -> nn.Module:
        return self.ema.module if (use_ema and self.ema is not None) else self.model

    def _validate(self) -> dict[str, float]:
        assert self.val_fn is not None
        m = self._eval_model(self.val_use_ema)
        was_training = self.model.training
        m.eval()
        try:
            with preserved_rng(self.generators), torch.no_grad():
                res = {k: _scalar(v) for k, v in dict(self.val_fn(m, self.step)).items()}
        finally:
            self.model.train(was_training)
        res = dist_utils.broadcast_object(res)
        self.last_val = res
        return res

    def _improved(self, val: Mapping[str, float]) -> bool:
        if self.best_key is None:
            return False
        if self.best_key not in val:
            raise KeyError(f"val_fn returned {sorted(val)}, not the best_key {self.best_key!r}")
        v = float(val[self.best_key])
        if not math.isfinite(v):
            return False
        old = self.best.get("value")
        better = old is None or (v < old if self.best_mode == "min" else v > old)
        if better:
            self.best.update(value=v, step=self.step)
        return better

    def _sample(self) -> None:
        if not self.is_main or self.sample_fn is None:
            return
        m = self._eval_model(True)
        out_dir = self.run_dir / "samples" / f"step_{self.step}"
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        m.eval()
        try:
            with preserved_rng(self.generators), torch.no_grad():
                self.sample_fn(m, self.step, out_dir)
        finally:
            self.model.train(was_training)

    # ---------------------------------------------------------------- logging
    def _reduce_window(self, window: dict[str, list[float]]) -> dict[str, float]:
        keys = sorted(window, key=lambda k: (k != "loss", k))  # loss first in log.csv
        means = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
        means = dist_utils.all_reduce_mean(means).cpu()
        return {k: float(v) for k, v in zip(keys, means.tolist())}

    def _summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "step": self.step,
            "max_steps": self.max_steps,
            "epoch": self.epoch,
            "wall_time_s": round(self.elapsed, 3),
            "best": dict(self.best),
            "train": dict(self.last_train),
            "val": dict(self.last_val),
        }

    # ---------------------------------------------------------------- main loop
    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps``; returns (and writes ``metrics.json`` with) the final metrics."""
        if not self._restored:
            self._restore()
        writer = csv_log = pbar = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm

            resumed_at = self.step if self.resume else None
            csv_log = CsvLog(self.run_dir / "log.csv", keep_until_step=resumed_at)
            # drop TensorBoard events the killed run wrote after its last checkpoint
            writer = SummaryWriter(
                str(self.run_dir / "tb"), purge_step=resumed_at + 1 if resumed_at is not None else None
            )
            pbar = tqdm(
                total=self.max_steps,
                initial=self.step,
                disable=not self.progress,
                desc=self.run_dir.name,
                dynamic_ncols=True,
            )
        self.status = "running"
        self.model.train()
        window: dict[str, list[float]] = {}
        t0, elapsed0, t_window = time.perf_counter(), self.elapsed, time.perf_counter()
        try:
            while self.step < self.max_steps:
                self.sampler.set_epoch(self.epoch, self.position)
                self._loader_gen.manual_seed(derive_seed(self.seed, self.epoch, self.dist.rank, 1))
                for batch in self.loader:
                    metrics = self._train_step(batch)
                    self.step += 1
                    self.position += 1
                    if self.position >= self.sampler.batches_per_epoch:
                        self.epoch, self.position = self.epoch + 1, 0
                    self.elapsed = elapsed0 + time.perf_counter() - t0
                    for k, v in metrics.items():
                        window.setdefault(k, []).append(v)
                    if pbar is not None:
                        pbar.update(1)
                    done = self.step >= self.max_steps
                    row: dict[str, Any] = {}
                    if self.step % self.log_every == 0 or done:
                        n = len(window.get("loss", [])) or 1
                        train = self._reduce_window(window)
                        train["lr"] = float(self.optimizer.param_groups[0]["lr"])
                        train["steps_per_s"] = n / max(time.perf_counter() - t_window, 1e-9)
                        window, t_window = {}, time.perf_counter()
                        self.last_train = train
                        row.update(train)
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{train['loss']:.4g}", lr=f"{train['lr']:.2e}")
                    improved = False
                    if self.val_fn is not None and self.val_every and (self.step % self.val_every == 0 or done):
                        val = self._validate()
                        row.update({f"val_{k}": v for k, v in val.items()})
                        improved = self._improved(val)
                    if row and self.is_main:
                        assert writer is not None and csv_log is not None
                        for k, v in row.items():
                            tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                            writer.add_scalar(tag, v, self.step)
                        writer.flush()
                        csv_log.append({"step": self.step, "epoch": self.epoch, **row, "wall_time": round(self.elapsed, 3)})
                    if self.sample_fn is not None and self.sample_every and (self.step % self.sample_every == 0 or done):
                        self._sample()
                    periodic = self.step % self.ckpt_every == 0
                    if periodic or done or improved:
                        self.save(latest=periodic or done, best=improved, keep=periodic and self.keep_last > 0)
                    if done:
                        break
            if self._last_saved_step != self.step:  # e.g. resumed at max_steps already
                self.save()
            self.status = "completed"
        except TrainingDiverged:
            self.status = "diverged"
            raise
        except BaseException:
            self.status = "interrupted"
            raise
        finally:
            if pbar is not None:
                pbar.close()
            if writer is not None:
                writer.close()
            if self.is_main and self.status in ("completed", "diverged"):
                write_json_atomic(self.run_dir / "metrics.json", self._summary(), sort_keys=True)
        dist_utils.barrier()
        return self._summary()


__all__ = [
    "EMA",
    "ResumableSampler",
    "Stateful",
    "Trainer",
    "TrainingDiverged",
    "move_to_device",
    "preserved_rng",
    "steps_per_epoch",
]
