"""Loading a trained DSDM run folder: ``dsdm.json``, the EMA weights of a checkpoint, the reference encoder.

:func:`load_dsdm` rebuilds a trained DSDM from its run folder (``dsdm.json`` + EMA weights of a
checkpoint + the copied reference encoder); weights from another architecture or preset are
rejected with a :class:`~diffusiondci.errors.UserInputError` listing the offending keys. The run
folder is written by ``train-dsdm`` (:mod:`diffusiondci.train.dsdm`); sampling, the probe and the
segmentation stage load it from here.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..errors import UserInputError
from ..models.reference_encoder import ReferenceEncoder, load_encoder
from ..models.unet import DSDMUNet, UNetConfig
from ..runs.checkpoint import find_checkpoint
from ..runs.ema_share import ema_initial_share
from ..runs.formats import DSDM_FORMAT, DSDM_META
from ..runs.record import read_run_record
from ..runs.weights import load_weights_safetensors
from .schedule import DiffusionSchedule

__all__ = ["DSDMRun", "load_dsdm"]


@dataclass
class DSDMRun:
    """What :func:`load_dsdm` found besides the network and the schedule."""

    run_dir: Path
    record: dict[str, Any]  # dsdm.json
    checkpoint: Path
    step: int | None
    encoder: ReferenceEncoder | None = None

    @property
    def image_size(self) -> int:
        return int(self.record["unet"]["image_size"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.record.get("data") or {})

    @property
    def color_norm(self) -> dict[str, Any] | None:
        return self.data.get("color_norm")


def _read_record(run_dir: Path) -> dict[str, Any]:
    record = read_run_record(run_dir, DSDM_META, DSDM_FORMAT, "DSDM", "train-dsdm")
    path = run_dir / DSDM_META
    for key in ("unet", "schedule"):
        if not isinstance(record.get(key), dict):
            raise UserInputError(f"'{key}' section missing; re-run train-dsdm --resume to rewrite it", path)
    return record


def load_dsdm(
    run_dir: str | Path,
    checkpoint: str = "latest",
    ema: bool = True,
    device: str | torch.device | None = None,
) -> tuple[DSDMUNet, DiffusionSchedule, DSDMRun]:
    """Rebuild a trained DSDM: ``(model in eval mode, training schedule, run info)``.

    ``checkpoint`` names a folder under ``checkpoints/`` (``latest``, ``best``, ``step_<N>``) or is a
    path to a checkpoint folder; ``ema`` loads the EMA weights (what sampling should use).
    """
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    # DSDM training keeps no "best" (no validation score): "best" falls back to the last one
    resolved = find_checkpoint(run_dir, checkpoint, "train-dsdm")
    cfg = UNetConfig.from_dict(record["unet"], run_dir / DSDM_META)
    model = DSDMUNet(cfg)
    load_weights_safetensors(model, resolved, strict=True, ema=ema)
    step = None
    try:
        step = int(json.loads((resolved / "meta.json").read_text())["step"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        pass
    if ema and step is not None:
        _warn_if_ema_is_mostly_initial(record, step, resolved)
    sched = record["schedule"]
    schedule = DiffusionSchedule(int(sched.get("num_timesteps", 1000)), sched.get("noise_schedule", "cosine"))
    dev = resolve_device(device)
    encoder = None
    if cfg.use_reference:
        enc_dir = run_dir / ((record.get("encoder") or {}).get("dir") or "encoder")
        encoder, _ = load_encoder(enc_dir, map_location="cpu")
        if encoder.embed_dim != cfg.ref_dim:
            raise UserInputError(
                f"encoder embeds to {encoder.embed_dim} numbers but the U-Net expects {cfg.ref_dim}; "
                "the run's encoder/ folder was replaced", enc_dir,
            )
        encoder.to(dev).eval()
    model.to(dev).eval()
    return model, schedule, DSDMRun(run_dir=run_dir, record=record, checkpoint=resolved, step=step, encoder=encoder)


def _warn_if_ema_is_mostly_initial(record: dict[str, Any], step: int, checkpoint: Path) -> None:
    training = record.get("training") or {}
    if "ema_decay" not in training:
        return
    share = ema_initial_share(float(training["ema_decay"]), bool(training.get("ema_warmup", False)), step)
    if share > 0.5:
        warnings.warn(
            f"the EMA weights of {checkpoint} (step {step}, ema_decay {training['ema_decay']}) are still "
            f"{share:.0%} the random initialisation: samples will be mostly noise; train longer, or sample "
            "without EMA (sample config use_ema: false)",
            stacklevel=3,
        )
