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
