"""The generic, exactly-resumable training loop (:class:`Trainer`) shared by every stage (SimCLR, DSDM,
segmenter).

A stage supplies a model, an optimizer, a map-style dataset and a ``step_fn`` that returns the loss
(e.g. the DSDM hybrid loss, paper Eq. 9, or the segmenter's cross-entropy); :class:`Trainer` does
everything else:

* a run folder ``run_dir/`` with ``config.json`` (written once, checked on resume), ``log.csv``,
  TensorBoard events under ``tb/``, ``checkpoints/{latest,best,step_<N>}/``, ``samples/`` and a
  final ``metrics.json``;
  (:mod:`.run_config` checks ``config.json``, :mod:`.training_log` writes ``log.csv``, ``tb/`` and
  the progress bar);
* seeded, resumable data order (:class:`~.data_order.ResumableSampler`: one permutation per epoch
  from ``(seed, epoch)``, each DDP rank takes its shard, the position within the epoch is saved);
* zero_grad / backward / gradient clipping / optimizer and LR-scheduler step / EMA update
  (:class:`~.ema.EMA`);
* a loss guard: a NaN/inf loss or gradient norm stops the run with :class:`TrainingDiverged`
  before the weights are touched, and the last good checkpoint is never overwritten;
* atomic checkpoints (:mod:`.trainer_checkpoints`; written by :mod:`.checkpoint`, read back by
  :mod:`diffusiondci.runs.checkpoint`) holding weights, EMA weights, optimizer, scheduler, sampler
  position and every RNG state (:mod:`.rng_state`), so that a killed run resumed with
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
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffusiondci.data.imageio import write_json_atomic
from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt
from diffusiondci.runs.seeds import derive_seed, seed_everything
from diffusiondci.runs.weights import unwrap_model

from . import distributed as dist_utils
from .data_order import ResumableSampler
from .ema import EMA
from .rng_state import preserved_rng
from .run_config import canonical_config, check_run_folder
from .trainer_checkpoints import TrainerCheckpoints
from .training_log import TrainingLog, reduce_window


class TrainingDiverged(UserInputError):
    """The loss (or gradient norm) became NaN/inf; the run stopped and kept its last good checkpoint."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


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


class Trainer(TrainerCheckpoints):
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
        if max_steps < 1:  # a run of 0 steps would be a "finished" run with untrained weights
            raise UserInputError(f"the number of training steps must be at least 1, got {max_steps}")
        if log_every < 1 or ckpt_every < 1:
            raise UserInputError("log_every and ckpt_every must be >= 1")
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
        self.config = canonical_config(config)
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
        """Check the run folder (kind, config, a usable checkpoint to resume from) before anything
        is written; every rank raises the same one-line error."""
        error: UserInputError | None = None
        if self.is_main:
            error = check_run_folder(self.run_dir, self.ckpt_root, self.config, self.resume)
        message = dist_utils.broadcast_object(str(error) if error is not None else None)
        if message is not None:
            raise error if error is not None else UserInputError(message)
        dist_utils.barrier()

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

    # ---------------------------------------------------------------- summary
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
        log = None
        if self.is_main:
            resumed_at = self.step if self.resume else None
            log = TrainingLog(self.run_dir, self.step, self.max_steps, resumed_at, self.progress)
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
                    if log is not None:
                        log.step_done()
                    done = self.step >= self.max_steps
                    row: dict[str, Any] = {}
                    if self.step % self.log_every == 0 or done:
                        n = len(window.get("loss", [])) or 1
                        train = reduce_window(window)
                        train["lr"] = float(self.optimizer.param_groups[0]["lr"])
                        train["steps_per_s"] = n / max(time.perf_counter() - t_window, 1e-9)
                        window, t_window = {}, time.perf_counter()
                        self.last_train = train
                        row.update(train)
                        if log is not None:
                            log.show(train)
                    improved = False
                    if self.val_fn is not None and self.val_every and (self.step % self.val_every == 0 or done):
                        val = self._validate()
                        row.update({f"val_{k}": v for k, v in val.items()})
                        improved = self._improved(val)
                    if row and self.is_main:
                        assert log is not None
                        log.write(self.step, self.epoch, row, round(self.elapsed, 3))
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
            if log is not None:
                log.close()
            if self.is_main and self.status in ("completed", "diverged"):
                write_json_atomic(self.run_dir / "metrics.json", self._summary(), sort_keys=True)
        dist_utils.barrier()
        return self._summary()


__all__ = ["Stateful", "Trainer", "TrainingDiverged", "move_to_device"]
