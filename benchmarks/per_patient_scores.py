"""Per-test-patient Dice of a label-budget experiment's segmenters (and, optionally, the MONAI reference).

The experiment reports Dice pooled over the whole test split. When one test patient holds most of
the test patches (GlaS prepared with a patient split: patient 10 has 276 of 420), the pooled score
is mostly that patient's, and one draw can be won or lost on it. This script reloads the finished
segmenter runs of ``experiment label-budget`` for one budget N (the runs the experiment linked
under ``runs/``), predicts the test split again with
each run's own test-time augmentation, and scores every test patient (``group`` of the manifest)
on its own: Dice per class, and the mean over the classes present in that patient's truth.

    python benchmarks/per_patient_scores.py --data DATASET --experiment EXPERIMENT_FOLDER --budget 16
        [--seeds 0,1,2] [--methods dci_with_unlabelled,plain_unet] [--monai] [--out per_patient.json]

``--monai`` retrains the MONAI reference of each draw with the settings the experiment recorded
(its weights are not kept; about 3 CPU minutes a draw) and prints its pooled Dice next to the
experiment's. Prints one table per patient and writes every score as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from diffusiondci.data.patch_dataset import PatchDataset, read_manifest
from diffusiondci.evaluation.metrics import confusion_matrix, scores_from_confusion
from diffusiondci.segmentation.run import load_segmenter
from diffusiondci.segmentation.tta import predict_with_tta


def _predict(fn, images: torch.Tensor, batch: int = 24) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([fn(images[i:i + batch]).argmax(1).numpy() for i in range(0, len(images), batch)])


def patient_scores(pred: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> dict:
    """Per patient: Dice per class (None where a class is in neither prediction nor truth), the mean
    over the classes present in the truth, and the patch count; ``all``: the pooled macro Dice."""
    out = {}
    for g in sorted(set(groups.tolist())):
        m = groups == g
        dice = scores_from_confusion(confusion_matrix(pred[m], truth[m]))["dice_per_class"]
        present = np.bincount(truth[m].ravel(), minlength=len(dice)) > 0
        kept = [d for d, p in zip(dice, present) if p and d is not None]
        out[g] = {"patches": int(m.sum()), "dice_per_class": dice,
                  "dice_present": float(np.mean(kept)) if kept else None}
    out["all"] = scores_from_confusion(confusion_matrix(pred, truth))["mean_dice"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the prepared dataset the experiment used")
    ap.add_argument("--experiment", type=Path, required=True, help="the label-budget experiment folder")
    ap.add_argument("--budget", type=int, required=True, help="N of the runs to score")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="dci_with_unlabelled,plain_unet")
    ap.add_argument("--monai", action="store_true", help="also retrain and score the MONAI reference")
    ap.add_argument("--out", type=Path, default=Path("bench_output/per_patient.json"))
    args = ap.parse_args()

    groups_of = {r["id"]: r["group"] for r in read_manifest(args.data)}
    test = PatchDataset(args.data, splits=("test",), with_masks=True, labelled_only=True)
    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])
    truth = torch.stack([it["mask"] for it in items]).long().numpy()
    groups = np.array([groups_of[it["id"]] for it in items])
    runs = args.experiment / "runs"  # the experiment's links to the runs it used
    fractions = {}
    for g in sorted(set(groups.tolist())):
        pixels = truth[groups == g]
        fractions[g] = (np.bincount(pixels.ravel(), minlength=3) / pixels.size).round(3).tolist()
    results: dict = {"fractions": fractions}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            run = runs / f"{method}_n{args.budget}_s{seed}"
            if not (run / "test_metrics.json").is_file():
                print(f"no finished run of {method} at N = {args.budget}, seed {seed}: skipped")
                continue
            seg = load_segmenter(run, device="cpu")
            results[f"{method} s{seed}"] = patient_scores(_predict(seg.predict, images), truth, groups)
        if args.monai:
            from diffusiondci.train.monai_reference import train_reference

            done = runs / f"monai_unet_n{args.budget}_s{seed}" / "scores.json"
            if not done.is_file():
                print(f"no finished MONAI reference at N = {args.budget}, seed {seed}: skipped")
                continue
            kept = json.loads(done.read_text())
            st = kept["settings"]
            _, _, net = train_reference(Path(st["data"]), None, int(st["seed"]), steps=int(st["steps"]),
                                        tta=st["tta"], preset=st["preset"])
            net.eval()
            scores = patient_scores(_predict(lambda b: predict_with_tta(net, b, st["tta"]), images), truth, groups)
            scores["experiment_pooled"] = kept["record"].get("tta", kept["record"])["dataset_dice"]
            results[f"monai_unet s{seed}"] = scores

    for g, share in fractions.items():
        print(f"patient {g} ({int((groups == g).sum())} patches; background / benign / malignant pixels {share})")
        for name, sc in results.items():
            if name != "fractions" and g in sc and sc[g]["dice_present"] is not None:
                print(f"  {name:<32} Dice over present classes {sc[g]['dice_present']:.3f}")
    for name, sc in results.items():
        if name != "fractions":
            kept = f" (the experiment's: {sc['experiment_pooled']:.3f})" if "experiment_pooled" in sc else ""
            print(f"pooled over the test split: {name:<32} {sc['all']:.3f}{kept}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
