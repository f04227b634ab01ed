"""Loading saved weights into a model: unwrapping, key and shape checks, safetensors only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusiondci.errors import UserInputError

from .checkpoint import EMA_FILE, MODEL_FILE, load_safetensors, resolve_checkpoint


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


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
    state = load_safetensors(path)
    report = check_state_dict(model, state, path, strict=strict)
    target = unwrap_model(model)
    target.load_state_dict(_strip_module_prefix(state, target.state_dict()), strict=strict)
    return report
