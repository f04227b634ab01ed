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
from diffusiondci.device import resolve_autocast
from diffusiondci.diffusion.generate import generate
from diffusiondci.diffusion.pipeline import SampleConfig, sample_to_folder
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.evaluation.generation_metrics import ModuleFeatureExtractor, frechet_distance
from diffusiondci.models.unet import UNET_PRESETS, DSDMUNet, tiny_config
from diffusiondci.train.dsdm import DSDMConfig, train_dsdm
from diffusiondci.train.encoder import EncoderConfig, load_encoder_run, train_encoder

VARIANTS = {  # Table 1 rows: (decoder_norm, use_reference)
    "none": ("group", False),
    "SM": ("spade", False),
    "RI": ("group", True),
    "SM+RI": ("spade", True),
}


def _monai_spade_unet(flash: bool) -> torch.nn.Module:
    """MONAI's ready-made SPADE diffusion U-Net at the tiny preset's widths, reference via cross-attention."""
    from monai.networks.nets import SPADEDiffusionModelUNet

    tiny = tiny_config()
    return SPADEDiffusionModelUNet(
        spatial_dims=2, in_channels=3, out_channels=6, label_nc=3, channels=tiny.channels,
        attention_levels=tiny.attention_levels, num_res_blocks=tiny.num_res_blocks,
        norm_num_groups=tiny.norm_num_groups, num_head_channels=tiny.num_head_channels,
        with_conditioning=True, cross_attention_dim=512, use_flash_attention=flash,
    )


def _train_step_fn(name: str, batch: int):
    """(one optimizer step on random data, parameter count) for a named configuration."""
    x = torch.randn(batch, 3, 64, 64)
    labels = torch.randint(0, 3, (batch, 64, 64))
    mask = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    ref = torch.randn(batch, 512)
    t = torch.randint(0, 1000, (batch,))
    precision = None
    if name.startswith("monai"):
        model = _monai_spade_unet(flash=name.endswith("sdpa"))

        def forward() -> torch.Tensor:
            return model(x, t, seg=mask, context=ref[:, None])
    else:
        native = resolve_autocast("auto", torch.device("cpu"))
        preset, precision = {"today (tiny_v1, fp32)": ("tiny_v1", None),
                             "tiny_narrow, default precision": ("tiny_narrow", native),
                             "new tiny, fp32": ("tiny", None),
                             "new tiny, default precision": ("tiny", native),
                             "new tiny, default precision, channels_last": ("tiny", native),
                             "new tiny, default precision, torch.compile": ("tiny", native)}[name]
        model = DSDMUNet(UNET_PRESETS[preset]())
        net = model
        if name.endswith("channels_last"):  # a lever measured, not used: no gain with bf16 here
            model = model.to(memory_format=torch.channels_last)
            x, mask = (v.contiguous(memory_format=torch.channels_last) for v in (x, mask))
        elif name.endswith("torch.compile"):  # inductor; its first steps (in the warm-up) compile
            net = torch.compile(model)

        def forward() -> torch.Tensor:
            return net(x, t, mask=mask, ref=ref)

    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward()
        loss = out.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


THROUGHPUT_CONFIGS = ("today (tiny_v1, fp32)", "new tiny, fp32", "new tiny, default precision",
                      "new tiny, default precision, channels_last", "new tiny, default precision, torch.compile",
                      "tiny_narrow, default precision",
                      "monai SPADEDiffusionModelUNet eager", "monai SPADEDiffusionModelUNet sdpa")


def throughput_table(batch: int = 8, rounds: int = 3) -> dict:
    """SM+RI training images/s of each configuration, interleaved round by round in one process (so
    a busy machine slows all of them alike); the best round counts. Also the CPU seconds per image."""
    torch.manual_seed(0)
    steps = {name: _train_step_fn(name, batch) for name in THROUGHPUT_CONFIGS}
    for step, _ in steps.values():
        step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _) in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            step()
            wall[name].append((time.perf_counter() - w0) / 2)
            cpu[name].append((time.process_time() - c0) / 2)
    base = min(wall[THROUGHPUT_CONFIGS[0]])
    return {
        name: {"parameters": steps[name][1], "images_per_s": round(batch / min(wall[name]), 2),
               "speedup_vs_today": round(base / min(wall[name]), 2),
               "cpu_s_per_image": round(min(cpu[name]) / batch, 4)}
        for name in steps
    }


def speed_figures(batch: int = 8) -> dict:
    out = {"threads": torch.get_num_threads(), "native_bf16": resolve_autocast("auto", torch.device("cpu")) == "bf16",
           "train_throughput": throughput_table(batch)}
    torch.manual_seed(0)
    model = DSDMUNet(tiny_config()).eval()
    schedule = DiffusionSchedule(1000)
    labels = torch.randint(0, 3, (batch, 64, 64))
    ref = torch.randn(batch, 512)
    for name, sampler, steps in (("ddim_25", "ddim", 25), ("ddpm_50_respaced", "ddpm", 50)):
        start = time.perf_counter()
        generate(model, schedule, labels, ref, sampler=sampler, steps=steps, guidance=3.0, seed=0,
                 batch_size=batch)
        out[f"sample_{name}_images_per_s"] = round(batch / (time.perf_counter() - start), 3)
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
    parser.add_argument("--speed-only", action="store_true", help="only the throughput / sampling-speed figures")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"preset": "tiny (64 px)", "device": "cpu", "threads": torch.get_num_threads()}
    if not args.skip_speed:
        figures["speed"] = speed_figures()
        print(json.dumps(figures["speed"], indent=2), flush=True)
        if args.speed_only:
            (work / "dsdm_speed.json").write_text(json.dumps(figures, indent=2))
            print(f"json: {work / 'dsdm_speed.json'}")
            return

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
