"""How fast does a DSDM become realistic? Scores a training run's checkpoints against wall-clock time.

    python benchmarks/dsdm_convergence.py --data DATASET --dsdm RUN [--n-eval 64] [--sample-steps 25]
        [--guidance 3] [--unet-steps 1500] [--unet-cache FILE.pt] [--out bench_output/convergence]

For every ``checkpoints/step_<N>`` of the DSDM run (train with ``keep_last`` large enough to keep
them) and its wall-clock time from ``log.csv``, the EMA weights sample one image for each of the
first ``--n-eval`` test patches (patients outside the training split; ``--split val`` takes the
validation patches instead, for choosing settings), conditioned on the patch's mask and on the patch
itself as reference image. Scores (SDM's protocol):

* FD and KID in the reference encoder's feature space, generated vs. the real held-out patches (and,
  as the yardstick, real training patches vs. the same held-out patches). The samples are
  conditioned on those patches' own embeddings, so this FD can fall far below the real-vs-real
  yardstick; ``fd_other_real`` scores them against the next ``--n-eval`` held-out patches instead
  (yardstick: the reference patches vs. those). At ``--n-eval`` 64 the 512-d FDs are mostly
  small-sample bias and swing between runs; ``fd_pca`` / ``fd_pca_other`` / ``kid_pca`` are the same
  distances after projecting onto the top ``--pca-dims`` principal axes of other real training
  patches, whitened (:class:`~diffusiondci.evaluation.generation_metrics.PrincipalProjection`),
  and are the ones to compare samplers and checkpoints by;
* gen-mIoU: an independent off-the-shelf MONAI U-Net, trained on the real train split (best
  validation checkpoint), segments the generated images; its mIoU against the conditioning masks,
  next to its mIoU on the real images of the same masks (``real_miou``). ``ratio`` = gen / real.

Writes ``convergence.json``, ``convergence.png`` (minutes -> FD and ratio) and a contact sheet per
checkpoint (mask | real | generated) under ``--out``; prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusiondci.data.imageio import write_png_atomic  # noqa: E402
from diffusiondci.data.patch_dataset import PatchDataset, to_uint8_image  # noqa: E402
from diffusiondci.data.preview import colour_mask  # noqa: E402
from diffusiondci.diffusion.dsdm_run import load_dsdm  # noqa: E402
from diffusiondci.diffusion.generate import generate  # noqa: E402
from diffusiondci.diffusion.picture_grid import make_grid  # noqa: E402
from diffusiondci.evaluation.generation_metrics import (  # noqa: E402
    ModuleFeatureExtractor,
    PrincipalProjection,
    frechet_distance,
    kernel_inception_distance,
)
from diffusiondci.evaluation.metrics import MetricAccumulator  # noqa: E402
from diffusiondci.models.embedding import embed_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monai_unet_reference import independent_net  # noqa: E402


def wall_minutes(run: Path) -> dict[int, float]:
    """Step -> minutes of training (``log.csv``'s wall_time), for the logged steps."""
    out: dict[int, float] = {}
    with open(run / "log.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("step") and row.get("wall_time"):
                out[int(row["step"])] = float(row["wall_time"]) / 60.0
    return out


def step_checkpoints(run: Path) -> list[int]:
    steps = []
    for d in (run / "checkpoints").glob("step_*"):
        try:
            steps.append(int(d.name.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


@torch.no_grad()
def segment(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict:
    acc = MetricAccumulator(3)
    for i in range(0, images.shape[0], 32):
        acc.update(net(images[i : i + 32]).argmax(1).numpy(), masks[i : i + 32].numpy())
    s = acc.compute()
    return {"miou": s["mean_iou"], "dice": s["mean_dice"], "dataset_miou": s["dataset"]["mean_iou"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dsdm", type=Path, required=True, help="train-dsdm run folder with step_<N> checkpoints")
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="patches whose masks condition the samples and whose images are the real side "
                         "(val: for choosing settings; test: for the figures to report)")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the samples")
    ap.add_argument("--autocast", default="fp32", help="sampling precision: fp32 | bf16 | auto")
    ap.add_argument("--steps", default=None, help="comma-separated checkpoint steps (default: all)")
    ap.add_argument("--unet-steps", type=int, default=1500, help="training steps of the independent U-Net")
    ap.add_argument("--unet-cache", type=Path, default=None,
                    help="a .pt file: reuse the independent U-Net trained there for the same data and steps")
    ap.add_argument("--pca-dims", type=int, default=16,
                    help="dimensions of the projected FD / KID (top principal axes of real training patches)")
    ap.add_argument("--basis-patches", type=int, default=256,
                    help="real training patches the principal axes are fitted on (not the yardstick's)")
    ap.add_argument("--save-samples", action="store_true",
                    help="also write the generated images as samples_step_<N>.npy (uint8, N x H x W x 3)")
    ap.add_argument("--out", type=Path, default=Path("bench_output/convergence"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    held_out = PatchDataset(args.data, splits=(args.split,), with_masks=True, labelled_only=True)
    items = [held_out[i] for i in range(min(args.n_eval, len(held_out)))]
    # the next n_eval held-out patches: real images the samples were *not* conditioned on. The FD
    # against the references themselves rewards copying their encoder embedding (the generator's own
    # condition); the FD against these does not.
    others = [held_out[i]["image"] for i in range(len(items), min(2 * len(items), len(held_out)))]
    real = torch.stack([it["image"] for it in items])  # the references: each mask's own image
    masks = torch.stack([it["mask"] for it in items]).long()

    start = time.perf_counter()
    ref_run, net = independent_net(args.data, args.unet_steps, args.unet_cache)
    print(f"independent U-Net: {ref_run['steps']} steps in {time.perf_counter() - start:.0f} s, "
          f"test mIoU {ref_run['mean_iou']:.3f}", flush=True)
    real_seg = segment(net, real, masks)

    minutes = wall_minutes(args.dsdm)
    wanted = step_checkpoints(args.dsdm)
    if args.steps:
        wanted = [s for s in wanted if s in {int(v) for v in args.steps.split(",")}]
    rows = []
    real_feats = other_feats = proj = real_z = other_z = None
    fd_real = fd_other_real = None
    yard: dict[str, float] = {}
    for step in wanted:
        model, schedule, info = load_dsdm(args.dsdm, checkpoint=f"step_{step}", device="cpu")
        extractor = ModuleFeatureExtractor(info.encoder) if info.encoder is not None else None
        if real_feats is None and extractor is not None:
            real_feats = extractor(real)
            # the yardstick: real training patches (other patients) against the same real held-out patches
            train = PatchDataset(args.data, splits=("train",), with_masks=True, labelled_only=True)
            train_imgs = torch.stack([train[i]["image"] for i in range(min(len(items), len(train)))])
            train_feats = extractor(train_imgs)
            fd_real = frechet_distance(train_feats, real_feats)
            print(f"FD real train vs real {args.split} patches: {fd_real:.2f}", flush=True)
            # the projection's axes come from other training patches than the yardstick's
            basis_ids = range(len(train_imgs), min(len(train_imgs) + args.basis_patches, len(train)))
            if len(basis_ids) > args.pca_dims:
                proj = PrincipalProjection(extractor(torch.stack([train[i]["image"] for i in basis_ids])),
                                           args.pca_dims)
                real_z = proj(real_feats)
                yard["fd_pca_real_train_vs_refs"] = frechet_distance(proj(train_feats), real_z)
            other_feats = extractor(torch.stack(others)) if len(others) >= 2 else None
            if other_feats is not None:
                fd_other_real = frechet_distance(real_feats, other_feats)
                print(f"FD real {args.split} references vs {len(others)} other real {args.split} patches: "
                      f"{fd_other_real:.2f}", flush=True)
                if proj is not None:
                    other_z = proj(other_feats)
                    yard["fd_pca_refs_vs_other_real"] = frechet_distance(real_z, other_z)
            print("projected yardsticks:", json.dumps(yard), flush=True)
        refs = embed_dataset(info.encoder, list(real), batch_size=64) if info.encoder is not None else None
        t0 = time.perf_counter()
        fake = generate(model, schedule, masks, refs, sampler=args.sampler, steps=args.sample_steps,
                        guidance=args.guidance, seed=args.seed, batch_size=32, autocast=args.autocast)
        sample_s = time.perf_counter() - t0
        gen_seg = segment(net, fake, masks)
        row = {"step": step, "minutes": round(minutes.get(step, float("nan")), 2), "sample_s": round(sample_s, 1),
               "gen_miou": gen_seg["miou"], "real_miou": real_seg["miou"],
               "ratio": gen_seg["miou"] / real_seg["miou"] if real_seg["miou"] else None,
               "gen_dataset_miou": gen_seg["dataset_miou"], "real_dataset_miou": real_seg["dataset_miou"]}
        if extractor is not None:
            fake_feats = extractor(fake)
            row["fd_encoder"] = frechet_distance(fake_feats, real_feats)
            if other_feats is not None:
                row["fd_other_real"] = frechet_distance(fake_feats, other_feats)
            row["kid_encoder"] = kernel_inception_distance(fake_feats, real_feats, subsets=50,
                                                           subset_size=min(50, len(items)))[0]
            if proj is not None:
                fake_z = proj(fake_feats)
                row["fd_pca"] = frechet_distance(fake_z, real_z)
                if other_z is not None:
                    row["fd_pca_other"] = frechet_distance(fake_z, other_z)
                row["kid_pca"] = kernel_inception_distance(fake_z, real_z, subsets=50,
                                                           subset_size=min(50, len(items)))[0]
        if args.save_samples:
            np.save(args.out / f"samples_step_{step}.npy",
                    np.stack([to_uint8_image(fake[i]) for i in range(fake.shape[0])]))
        rows.append(row)
        sheet = [[colour_mask(masks[i].numpy()), to_uint8_image(real[i]), to_uint8_image(fake[i])]
                 for i in range(min(8, len(items)))]
        write_png_atomic(args.out / f"contact_step_{step}.png", make_grid(sheet))
        print(json.dumps(row), flush=True)

    (args.out / "convergence.json").write_text(json.dumps(
        {"data": str(args.data), "dsdm": str(args.dsdm), "n_eval": len(items), "split": args.split, "sampler": args.sampler,
         "sample_steps": args.sample_steps, "guidance": args.guidance, "seed": args.seed, "autocast": args.autocast, "independent_unet": ref_run,
         "fd_real_train_vs_test": fd_real, "fd_real_refs_vs_other_real": fd_other_real,
         "n_other_real": len(others), "pca_dims": args.pca_dims if proj is not None else None, **yard,
         "rows": rows}, indent=2))
    if rows:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        mins = [r["minutes"] for r in rows]
        if "fd_encoder" in rows[0]:
            ax[0].plot(mins, [r["fd_encoder"] for r in rows], "o-", label="generated vs their references")
            if "fd_other_real" in rows[0]:
                ax[0].plot(mins, [r["fd_other_real"] for r in rows], "s-", label="generated vs other real patches")
            if fd_real is not None:
                ax[0].axhline(fd_real, ls="--", c="grey", label=f"real train vs real {args.split}")
            if fd_other_real is not None:
                ax[0].axhline(fd_other_real, ls=":", c="grey", label="references vs other real patches")
            ax[0].legend(fontsize=7)
        ax[0].set(xlabel="training minutes", ylabel="FD (encoder features)", title="realism")
        ax[1].plot(mins, [r["ratio"] for r in rows], "o-")
        ax[1].axhline(0.8, ls="--", c="grey")
        ax[1].set(xlabel="training minutes", ylabel="gen mIoU / real mIoU", title="semantic fidelity",
                  ylim=(0, max([1.1] + [1.05 * r["ratio"] for r in rows if r["ratio"] is not None])))
        fig.tight_layout()
        fig.savefig(args.out / "convergence.png", dpi=100)
    print(f"\n{'step':>6} {'min':>6} {'FD':>8} {'FD other':>8} {'KID':>8} {'FDpca':>7} {'FDpca o':>7} "
          f"{'gen mIoU':>9} {'real mIoU':>9} {'ratio':>6}")
    nan = float("nan")
    for r in rows:
        print(f"{r['step']:>6} {r['minutes']:>6.1f} {r.get('fd_encoder', nan):>8.2f} "
              f"{r.get('fd_other_real', nan):>8.2f} {r.get('kid_encoder', nan):>8.4f} "
              f"{r.get('fd_pca', nan):>7.2f} {r.get('fd_pca_other', nan):>7.2f} "
              f"{r['gen_miou']:>9.3f} {r['real_miou']:>9.3f} {r['ratio']:>6.2f}")
    print(f"wrote {args.out / 'convergence.json'}")


if __name__ == "__main__":
    main()
