"""An off-the-shelf MONAI U-Net on a DiffusionDCI patch dataset: the yardstick for "same budget".

The experiments compare DiffusionDCI with a plain U-Net that shares its (diffusion) backbone and its
number of optimizer steps. This script answers the other question a user asks: what does a small,
fast, off-the-shelf ``monai.networks.nets.UNet`` reach on the same patches, the same patient split,
the same labelled subset and the same metrics, given a number of steps *or a wall-clock budget*?

The training itself lives in :mod:`diffusiondci.train.monai_reference` (also the ``monai_unet``
method of ``experiment label-budget``): the segmentation stage's own augmentation, label draw by
slide and metrics, the checkpoint with the best validation Dice, scored on the test split.

    python benchmarks/monai_unet_reference.py --data DATASET [--labelled 0,16] [--seeds 0,1,2]
        [--steps 100] [--seconds 120] [--out bench_output/monai_unet.json]

``--labelled`` lists annotation budgets in slides (0 = every labelled training slide); each budget
and seed is trained once per limit given (``--steps`` and/or ``--seconds``). Prints a table (mean ±
std over seeds) and writes every run's scores as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from monai.networks.nets import UNet

from diffusiondci.train.monai_reference import make_reference_unet, train_reference


def train_one(data: Path, labelled: int | None, seed: int, steps: int | None, seconds: float | None,
              val_every: int, batch_size: int, lr: float, return_net: bool = False,
              tta: str = "none") -> dict | tuple[dict, UNet]:
    """One run (:func:`diffusiondci.train.monai_reference.train_reference`); its record, and with
    ``return_net`` the trained network with the best validation Dice."""
    record, _, net = train_reference(data, labelled, seed, steps, seconds, val_every, batch_size, lr, tta=tta)
    return (record, net) if return_net else record


def independent_net(data: Path, steps: int, cache: Path | None = None) -> tuple[dict, UNet]:
    """The U-Net trained on every labelled training patch of ``data`` for ``steps`` steps (seed 0,
    best validation checkpoint), as the generator benchmarks' independent judge. With ``cache``
    (a ``.pt`` file) a net trained before for the same data and steps is reloaded instead."""
    meta = cache.with_suffix(".json") if cache is not None else None
    if cache is not None and cache.exists() and meta.exists():
        record = json.loads(meta.read_text())
        if record.get("data") == str(Path(data).resolve()) and record.get("steps") == steps:
            net = make_reference_unet()
            net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            return record, net.eval()
    record, net = train_one(data, None, 0, steps, None, 50, 12, 1e-3, return_net=True)
    record["data"] = str(Path(data).resolve())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), cache)
        meta.write_text(json.dumps(record, indent=2))
    return record, net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder made by `diffusiondci prepare`")
    ap.add_argument("--labelled", default="0", help="annotation budgets in slides, comma-separated; 0 = all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    ap.add_argument("--seconds", type=float, default=None, help="training wall-clock budget per run")
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tta", default="none", choices=["none", "flip", "dihedral"],
                    help="also score the test split under this test-time augmentation (record key 'tta')")
    ap.add_argument("--out", type=Path, default=Path("bench_output/monai_unet.json"))
    args = ap.parse_args()
    limits = ([("steps", args.steps)] if args.steps else []) + ([("seconds", args.seconds)] if args.seconds else [])
    if not limits:
        ap.error("give --steps and/or --seconds")
    runs = []
    for kind, value in limits:
        for n in [int(v) for v in args.labelled.split(",")]:
            for seed in [int(v) for v in args.seeds.split(",")]:
                r = train_one(args.data, n or None, seed, value if kind == "steps" else None,
                              value if kind == "seconds" else None, args.val_every, args.batch_size, args.lr,
                              tta=args.tta)
                r["limit"] = f"{kind}={value:g}"
                runs.append(r)
                print(json.dumps(r))
    print(f"\n{'limit':>14} {'labelled':>8} {'steps':>6} {'Dice':>15} {'mIoU':>15}")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["limit"], str(r["labelled"])), []).append(r)
    summary = []
    for (limit, n), rs in groups.items():
        d = [r["mean_dice"] for r in rs]
        m = [r["mean_iou"] for r in rs]
        row = {"limit": limit, "labelled": n, "n": len(rs), "steps": round(statistics.mean(r["steps"] for r in rs)),
               "dice_mean": statistics.mean(d), "dice_std": statistics.pstdev(d),
               "miou_mean": statistics.mean(m), "miou_std": statistics.pstdev(m)}
        summary.append(row)
        print(f"{limit:>14} {n:>8} {row['steps']:>6} {row['dice_mean']:.3f} ± {row['dice_std']:.3f}   "
              f"{row['miou_mean']:.3f} ± {row['miou_std']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
