"""The checkpoint side of the :class:`~diffusiondci.train.loop.Trainer`: what a checkpoint holds,
writing ``latest`` / ``best`` / ``step_<N>``, and restoring all of it on resume.

A checkpoint holds the weights, the EMA weights, the optimizer, the LR scheduler, the position in
the data order, every RNG stream of every process and the registered extra state, so that a
resumed run continues bit for bit (see :mod:`.loop`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt
from diffusiondci.runs.seeds import derive_seed, seed_everything
from diffusiondci.runs.weights import check_state_dict

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .rng_state import capture_rng_state, restore_rng_state


class TrainerCheckpoints:
    """Checkpoint methods mixed into :class:`~diffusiondci.train.loop.Trainer` (they use its state:
    ``model``, ``ema``, ``optimizer``, ``scheduler``, ``sampler``, ``generators``, ``extra_state``,
    ``step`` / ``epoch`` / ``position``, ``dist`` and the run folder paths)."""

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
        rng_states = dist_utils.all_gather_object(capture_rng_state(self.generators))
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
                warnings.warn(f"{self.run_dir}: the run stopped before its first checkpoint; starting it from "
                              "step 0", stacklevel=3)
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
            restore_rng_state(rngs[self.dist.rank], self.generators)
        else:
            warnings.warn(
                f"checkpoint was written by {len(rngs)} processes, now {self.dist.world_size}: data "
                "order and random streams will differ from an uninterrupted run",
                stacklevel=3,
            )
            restore_rng_state(rngs[0], self.generators)
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
