"""Segmentation benchmark at the tiny preset on CPU (issue 5).

1. Speed: tiles/s of the segmenter alone (``injection none``) and with the frozen DSDM's feature
   extraction + CAA (``injection caa``), batch 12 of 64 px tiles, forward only.
2. Whole-slide inference: wall time and peak RSS of ``diffusiondci segment`` (child process) on a
   generated tiled TIFF of ``--slide-size``² px, with a tiny-preset model.
3. GlaS (patient split, tiny preset, 64 px patches): test Dice / mIoU (mean ± std over seeds) of the
   plain U-Net, the denoising U-Net (``none``), ``skip``, ``caa`` (``experiment table5``) and ``caa``
   with synthetic ratios (``experiment fig6``), all with the same number of training steps.

    python benchmarks/seg_bench.py --glas-data DATASET --dsdm RUN --encoder RUN [--seeds 0,1,2]
        [--seg-steps 150] [--ratios 0,0.25,0.5,1] [--workdir bench_output/seg]

``DATASET`` is GlaS prepared as in the README; ``RUN``s are a tiny-preset ``train-dsdm`` run on it
and its encoder (training them is left to the user so that the budget is explicit). Prints the
figures and writes them as JSON. ``--skip-glas`` / ``--skip-slide`` leave parts out.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_slide import write_slide  # noqa: E402

from diffusiondci.config import build, load_section  # noqa: E402
from diffusiondci.diffusion.schedule import DiffusionSchedule  # noqa: E402
from diffusiondci.evaluation.experiments import ExperimentConfig, run_experiment  # noqa: E402
from diffusiondci.models.reference_encoder import ReferenceEncoder  # noqa: E402
from diffusiondci.models.segmenter import Segmenter, segmenter_unet_config  # noqa: E402
from diffusiondci.models.unet import DSDMUNet, tiny_config  # noqa: E402
from diffusiondci.segmentation.features import DiffusionFeatureExtractor  # noqa: E402
from diffusiondci.segmentation.model import SegmentationModel  # noqa: E402


def speed(batch: int = 12, repeats: int = 5) -> dict:
    torch.manual_seed(0)
    seg_cfg = load_section("tiny", "seg")
    dsdm = DSDMUNet(tiny_config())
    fx = DiffusionFeatureExtractor(dsdm, DiffusionSchedule(1000), ReferenceEncoder(512, 0.25), seg_cfg["blocks"],
                                   seg_cfg["timesteps"])
    unet = segmenter_unet_config(dsdm.config)
    models = {
        "segmenter_only": SegmentationModel(Segmenter(unet, "none"), None),
        "with_dsdm_features_caa": SegmentationModel(Segmenter(unet, "caa", fx.feature_channels()), fx),
    }
    x = torch.randn(batch, 3, 64, 64)
    out = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            model(x)
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
        out[f"{name}_tiles_per_s"] = round(repeats * batch / (time.perf_counter() - start), 2)
    return out


def slide_figures(work: Path, size: int, model_run: Path) -> dict:
    slide = work / f"slide_{size}.tif"
    if not slide.exists():
        write_slide(slide, size, acq_tile=256)
    out = work / "segment_out"
    cmd = [sys.executable, "-m", "diffusiondci.cli", "segment", "--model", str(model_run), str(slide), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"slide_px": f"{size}x{size}", "segment_wall_s": round(wall, 1), "segment_peak_rss_mb": round(rss_mb, 1),
            "raw_slide_mb": round(size * size * 3 / 2**20, 1)}


def glas_figures(args: argparse.Namespace, work: Path) -> dict:
    base = dict(load_section("tiny", "experiment"))
    cfg = build(ExperimentConfig, base, seeds=[int(s) for s in args.seeds.split(",")], seg_steps=args.seg_steps,
                ratios=[float(r) for r in args.ratios.split(",")], sample_steps=args.sample_steps)
    assets = work / "assets"
    figures = {}
    for name in ("table5", "fig6"):
        start = time.perf_counter()
        out = run_experiment(name, args.glas_data, work / name, "tiny", cfg, assets=assets, dsdm=args.dsdm,
                             encoder=args.encoder)
        with open(out / "summary.csv", newline="") as fh:
            figures[name] = list(csv.DictReader(fh))
        figures[f"{name}_wall_s"] = round(time.perf_counter() - start, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glas-data", type=Path)
    parser.add_argument("--dsdm", type=Path)
    parser.add_argument("--encoder", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seg-steps", type=int, default=150)
    parser.add_argument("--ratios", default="0,0.25,0.5,1")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--slide-model", type=Path, help="segmentation run for the slide timing (default: the "
                        "seed-0 caa run of table5)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_output/seg"))
    parser.add_argument("--skip-glas", action="store_true")
    parser.add_argument("--skip-slide", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"preset": "tiny (64 px)", "device": "cpu", "threads": torch.get_num_threads()}
    if not args.skip_speed:
        figures["speed"] = speed()
        print(json.dumps(figures["speed"]), flush=True)
    if not args.skip_glas:
        if not (args.glas_data and args.dsdm and args.encoder):
            parser.error("the GlaS part needs --glas-data, --dsdm and --encoder (or pass --skip-glas)")
        figures["glas"] = glas_figures(args, work)
    if not args.skip_slide:
        model = args.slide_model or work / "table5" / "runs" / "caa_s0"
        figures["slide"] = slide_figures(work, args.slide_size, model)
        print(json.dumps(figures["slide"]), flush=True)
    (work / "seg_bench.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"json: {work / 'seg_bench.json'}")


if __name__ == "__main__":
    main()
