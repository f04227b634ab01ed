"""DSDM benchmark at the tiny preset on CPU: size, training and sampling speed, and the Table 1
generator ablation (none / SM / RI / SM+RI) on GlaS, scored by the Frechet distance in the
reference encoder's feature space against the real test images.

    python benchmarks/dsdm_bench.py [--glas ../shared/data/glas] [--steps 300] [--n-eval 96]

Every variant gets the same training budget (``--steps`` iterations, tiny preset). Samples use
DDIM with ``--sample-steps`` steps and guidance s = 3 (ignored by the unconditional baseline); the
conditioning masks and references are the first ``--n-eval`` test patches (patient split). Prints
the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffusiondci.config import build, load_section
from diffusiondci.data.imageio import read_rgb
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.data.prepare import PrepareConfig, prepare_dataset
from diffusiondci.diffusion.generate import generate
from diffusiondci.diffusion.pipeline import SampleConfig, sample_to_folder
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.evaluation.generation_metrics import ModuleFeatureExtractor, frechet_distance
from diffusiondci.models.unet import DSDMUNet, tiny_config
from diffusiondci.train.dsdm import DSDMConfig, train_dsdm
from diffusiondci.train.encoder import EncoderConfig, load_encoder_run, train_encoder

VARIANTS = {  # Table 1 rows: (decoder_norm, use_reference)
    "none": ("group", False),
    "SM": ("spade", False),
    "RI": ("group", True),
    "SM+RI": ("spade", True),
}


def speed_figures(batch: int = 8) -> dict:
    torch.manual_seed(0)
    model = DSDMUNet(tiny_config())
    params = sum(p.numel() for p in model.parameters())
    schedule = DiffusionSchedule(1000)
    x = torch.randn(batch, 3, 64, 64)
    mask = torch.nn.functional.one_hot(torch.randint(0, 3, (batch, 64, 64)), 3).permute(0, 3, 1, 2).float()
    ref = torch.randn(batch, 512)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    t = torch.randint(0, 1000, (batch,))
    for i in range(6):  # 1 warm-up + 5 timed
        if i == 1:
            start = time.perf_counter()
        loss = model(x, t, mask=mask, ref=ref).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_ips = 5 * batch / (time.perf_counter() - start)
    model.eval()
    labels = mask.argmax(1)
    out = {"parameters": params, "train_images_per_s": round(train_ips, 2)}
    for name, sampler, steps in (("ddim_25", "ddim", 25), ("ddpm_50_respaced", "ddpm", 50)):
        start = time.perf_counter()
        generate(model, schedule, labels, ref, sampler=sampler, steps=steps, guidance=3.0, seed=0,
                 batch_size=batch)
        out[f"sample_{name}_images_per_s"] = round(batch / (time.perf_counter() - start), 3)
    start = time.perf_counter()
    generate(model, schedule, labels[:2], ref[:2], sampler="ddpm", steps=None, guidance=3.0, seed=0, batch_size=2)
    out["sample_ddpm_1000_images_per_s"] = round(2 / (time.perf_counter() - start), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glas", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glas")
    parser.add_argument("--workdir", type=Path, default=Path("bench_output/dsdm"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--encoder-steps", type=int, default=150)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--variants", default="none,SM,RI,SM+RI")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"preset": "tiny (64 px)", "device": "cpu", "threads": torch.get_num_threads()}
    if not args.skip_speed:
        figures["speed"] = speed_figures()
        print(json.dumps(figures["speed"], indent=2), flush=True)

    data = work / "glas_tiny"
    if not data.exists():
        cfg = build(PrepareConfig, load_section("tiny", "prepare"), roi_size=256, stride=256, patch_size=64,
                    tile_size=1024, norm_target="dataset")
        prepare_dataset(args.glas / "images", data, cfg, masks_dir=args.glas / "masks",
                        groups_csv=args.glas / "manifest.csv")
    enc_run = work / "encoder"
    if not (enc_run / "encoder").exists():
        shutil.rmtree(enc_run, ignore_errors=True)
        train_encoder(data, enc_run, build(EncoderConfig, load_section("tiny", "encoder"), steps=args.encoder_steps))
    encoder, _ = load_encoder_run(enc_run)
    features = ModuleFeatureExtractor(encoder)

    test = PatchDataset(data, splits=("test",))
    eval_ids = test.ids[: args.n_eval]
    masks_dir, refs_dir = work / "eval_masks", work / "eval_refs"
    for folder in (masks_dir, refs_dir):
        folder.mkdir(exist_ok=True)
    for pid in eval_ids:
        shutil.copy(data / "masks" / f"{pid}.png", masks_dir / f"{pid}.png")
        shutil.copy(data / "images" / f"{pid}.png", refs_dir / f"{pid}.png")
    real = np.stack([read_rgb(data / "images" / f"{pid}.png") for pid in eval_ids])
    real_feats = features(real)
    train_real = PatchDataset(data, splits=("train",))
    train_ids = train_real.ids[: args.n_eval]
    train_feats = features(np.stack([read_rgb(data / "images" / f"{pid}.png") for pid in train_ids]))
    figures["fd_real_train_vs_test"] = round(frechet_distance(train_feats, real_feats), 3)

    table = {}
    for name in args.variants.split(","):
        norm, use_ref = VARIANTS[name]
        run = work / f"dsdm_{name.replace('+', '_')}"
        cfg = build(DSDMConfig, load_section("tiny", "dsdm"), steps=args.steps, decoder_norm=norm,
                    use_reference=use_ref, sample_every=0)
        start = time.perf_counter()
        if not (run / "dsdm.json").exists() or not (run / "metrics.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            train_dsdm(data, run, cfg, encoder_run=enc_run if use_ref else None)
        train_s = time.perf_counter() - start
        out = work / f"samples_{name.replace('+', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        scfg = build(SampleConfig, load_section("tiny", "sample"), steps=args.sample_steps)
        start = time.perf_counter()
        sample_to_folder(run, masks_dir, out, scfg, references=refs_dir)
        sample_s = time.perf_counter() - start
        fake = np.stack([read_rgb(out / "images" / f"{pid}.png") for pid in eval_ids])
        fd = frechet_distance(features(fake), real_feats)
        table[name] = {"fd_encoder": round(fd, 3), "train_s": round(train_s, 1), "sample_s": round(sample_s, 1)}
        print(name, table[name], flush=True)
    figures["table1"] = table
    figures["settings"] = {"train_steps": args.steps, "encoder_steps": args.encoder_steps, "n_eval": len(eval_ids),
                           "sampler": f"ddim {args.sample_steps} steps, guidance 3"}
    (work / "dsdm_bench.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"json: {work / 'dsdm_bench.json'}")


if __name__ == "__main__":
    main()
