"""What a training run records as it goes: ``log.csv``, TensorBoard scalars and the progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusiondci.progress import progress_bar
from diffusiondci.runs.csv_log import CsvLog

from . import distributed as dist_utils


def reduce_window(window: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each metric over the steps of ``window`` and over all processes (``loss`` first)."""
    keys = sorted(window, key=lambda k: (k != "loss", k))  # loss first in log.csv
    means = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
    means = dist_utils.all_reduce_mean(means).cpu()
    return {k: float(v) for k, v in zip(keys, means.tolist())}


class TrainingLog:
    """Rank 0's record of a run in ``run_dir``: ``log.csv``, TensorBoard events under ``tb/`` and the
    progress from ``step`` to ``max_steps`` (:func:`~diffusiondci.progress.progress_bar`: a tqdm bar
    on a terminal, a plain line with loss, speed and ETA every 30 s otherwise).

    ``resumed_at`` (the step a resumed run continues from; None for a new run) drops the rows and
    events the killed run wrote after its last checkpoint.
    """

    def __init__(self, run_dir: Path, step: int, max_steps: int, resumed_at: int | None, progress: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.csv = CsvLog(run_dir / "log.csv", keep_until_step=resumed_at)
        # drop TensorBoard events the killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_at + 1 if resumed_at is not None else None)
        # a bar on a terminal; plain lines with speed and ETA in a log file (no carriage returns)
        self.bar = progress_bar(max_steps, run_dir.name, unit="step", enabled=progress, initial=step)

    def step_done(self) -> None:
        self.bar.update(1)

    def show(self, train: dict[str, float]) -> None:
        """Loss and learning rate of the last window on the bar."""
        self.bar.set_postfix(loss=f"{train['loss']:.4g}", lr=f"{train['lr']:.2e}")

    def write(self, step: int, epoch: int, row: dict[str, Any], wall_time: float) -> None:
        """One row: ``train/<name>`` and ``val/<name>`` scalars to TensorBoard, the row to ``log.csv``."""
        for k, v in row.items():
            tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()
        self.csv.append({"step": step, "epoch": epoch, **row, "wall_time": wall_time})

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
