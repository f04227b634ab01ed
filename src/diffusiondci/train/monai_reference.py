"""The off-the-shelf yardstick: a small ``monai.networks.nets.UNet`` trained on a DiffusionDCI patch
dataset with the segmentation stage's own augmentation, label draw, validation choice and metrics.

DiffusionDCI exists to beat this network, so it runs in the same places as our segmenters: the
``label-budget`` experiment (method ``monai_unet``, the same labelled draw, a step budget) and
``benchmarks/monai_unet_reference.py`` (budgets by steps or wall-clock seconds). The recipe is the
network's plain one: cross-entropy, Adam at a constant rate, the checkpoint with the best
validation Dice (the last one when the dataset has no validation patches).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import build, load_section
from ..data.patch_dataset import PatchDataset
from .seg_augment import augment_batch
from .seg_config import SegConfig
from .seg_data import choose_labelled, labelled_groups
from .segmentation import predict_dataset


def make_reference_unet():
    """The reference network: MONAI's U-Net, channels 16-32-64-128, two residual units per level."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2)


def _stack(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]).long()


def _split(data: Path, name: str) -> PatchDataset | None:
    ds = PatchDataset(data, splits=(name,), with_masks=True, labelled_only=True)
    return ds if len(ds) else None


def train_reference(data: str | Path, labelled: int | None, seed: int, steps: int | None = None,
                    seconds: float | None = None, val_every: int = 50, batch_size: int = 12, lr: float = 1e-3,
                    tta: str = "none", preset: str = "tiny") -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Train one reference U-Net on ``data``; returns ``(record, scores, net)``.

    ``labelled``: how many labelled training slides to draw (``None``: all), drawn as ``train-seg
    --labelled`` draws them. The run stops at ``steps`` optimizer steps or ``seconds`` of training
    time, whichever comes first (at least one must be given). ``record`` holds the summary the
    benchmark prints (test scores without and, when ``tta`` is not ``none``, with test-time
    augmentation under ``record["tta"]``); ``scores`` is the metrics dict of the test scoring under
    ``tta`` (what DiffusionDCI's segmenters are scored with), plus ``wall_s``.
    """
    if steps is None and seconds is None:
        raise ValueError("give steps and/or seconds")
    data = Path(data)
    torch.manual_seed(seed)
    cfg = build(SegConfig, load_section(preset, "seg"), seed=seed)
    real = PatchDataset(data, splits=("train",), with_masks=True, labelled_only=True)
    chosen = choose_labelled(real.ids, labelled, seed, labelled_groups(real, "slide"))
    x_all, y_all = _stack(real, chosen)
    val, test = _split(data, "val"), _split(data, "test")
    if test is None:
        raise ValueError(f"{data} has no labelled test patches to score the reference U-Net on")
    net = make_reference_unet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, step, start, train_s = -1.0, None, 0, time.perf_counter(), 0.0
    while (steps is None or step < steps) and (seconds is None or train_s < seconds):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(chosen), (batch_size,), generator=gen)
        x, y = augment_batch(x_all[idx], y_all[idx], cfg, gen)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        train_s += time.perf_counter() - t0
        if val is not None and step % val_every == 0:
            dice = predict_dataset(net, val).compute()["mean_dice"] or 0.0
            if dice > best:
                best, best_state = dice, copy.deepcopy(net.state_dict())
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    plain = predict_dataset(net, test).compute()
    record = {"labelled": "all" if labelled is None else labelled, "seed": seed, "steps": step,
              "train_s": round(train_s, 1), "wall_s": None, "labelled_patches": len(chosen),
              "val_dice": round(best, 4) if best_state is not None else None,
              "mean_dice": plain["mean_dice"], "mean_iou": plain["mean_iou"], "accuracy": plain["accuracy"],
              "dataset_dice": plain["dataset"]["mean_dice"], "dataset_iou": plain["dataset"]["mean_iou"],
              "dice_per_class": plain["dice_per_class"]}
    scores = plain
    if tta != "none":
        scores = predict_dataset(net, test, tta=tta).compute()
        record["tta"] = {"mode": tta, "mean_dice": scores["mean_dice"], "dataset_dice": scores["dataset"]["mean_dice"],
                         "dice_per_class": scores["dice_per_class"]}
    record["wall_s"] = round(time.perf_counter() - start, 1)
    return record, {**scores, "wall_s": record["wall_s"], "steps": step, "tta": tta}, net
