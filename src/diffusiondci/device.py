"""Which torch device a command runs on: one rule for every stage.

``--device`` is ``cpu``, ``cuda`` or ``cuda:N``; left out, the GPU when PyTorch sees one, else the
CPU. A CUDA device without an index is the process's ``LOCAL_RANK`` GPU (0 outside ``torchrun``).
A device that does not exist here is a :class:`UserInputError` that says what to use instead.
"""

from __future__ import annotations

import torch

from .errors import UserInputError


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The checked ``torch.device`` for ``device`` (see the module docstring); touches no GPU state."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device("cuda", local_rank)
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise UserInputError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError(f"--device {device} asked for, but torch sees no CUDA GPU here; use --device cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise UserInputError(
            f"{dev} asked for (LOCAL_RANK={local_rank}) but only {torch.cuda.device_count()} CUDA GPU(s) are "
            "visible: use --device cuda:0 up to the last GPU, start at most one process per GPU "
            "(torchrun --nproc_per_node), or --device cpu"
        )
    return dev


#: ``autocast`` settings: ``auto`` (bf16 where the hardware computes it natively, else fp32), ``bf16``
#: (bf16 where native, fp32 with a warning where it would only be emulated) and ``fp32`` / ``null``.
AUTOCAST_CHOICES = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU whose oneDNN
    has bf16 kernels (AVX512-BF16 / AMX). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_autocast(setting: str | None, device: torch.device) -> str | None:
    """The autocast a run uses on ``device``: ``"bf16"`` or None (fp32); see :data:`AUTOCAST_CHOICES`."""
    if setting in (None, "fp32", "none", "off"):
        return None
    if setting not in AUTOCAST_CHOICES:
        raise UserInputError(f"autocast must be one of {AUTOCAST_CHOICES} or null, got {setting!r}")
    if native_bf16(device):
        return "bf16"
    if setting == "bf16":
        import warnings

        warnings.warn(
            f"autocast bf16 asked for, but {device} has no native bf16 (it would be emulated, slower than fp32); "
            "training in fp32",
            stacklevel=2,
        )
    return None
