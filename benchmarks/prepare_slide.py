"""Benchmark ``diffusiondci prepare`` on a generated 21024 x 21024 tiled TIFF (paper preset).

Writes the slide tile by tile (never whole in memory), a GeoJSON annotation, then runs
``diffusiondci prepare`` in a child process and reports its wall time, CPU time and peak memory
(peak RSS: ru_maxrss of the child) next to the slide's raw size, with the machine's CPU count and
load average (timings are only comparable on a quiet machine). Prints the figures and writes them
as JSON. Pass ``--repeat N`` to time N runs (the figures of each run and the best).

    python benchmarks/prepare_slide.py [--size 21024] [--workdir bench_output/prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

TIFF_TILE = 512


def _textures(rng: np.random.Generator, n: int = 8) -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    out = []
    for _ in range(n):
        noise = rng.random((TIFF_TILE, TIFF_TILE, 3)).astype(np.float32)
        smooth = gaussian_filter(noise, sigma=(3, 3, 0))
        tex = np.clip((smooth - smooth.mean()) * 6 + 0.5, 0, 1)
        out.append((tex * np.array([180, 140, 220], np.float32) + 20).astype(np.float32))
    return out


def write_slide(path: Path, size: int, acq_tile: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    textures = _textures(rng)
    n_acq = -(-size // acq_tile)
    gains = rng.uniform(0.75, 1.25, size=(n_acq, n_acq, 3)).astype(np.float32)
    centre, radius = size / 2, size * 0.45

    def tiles():
        yy, xx = np.mgrid[0:TIFF_TILE, 0:TIFF_TILE]
        for ty in range(0, size, TIFF_TILE):
            for tx in range(0, size, TIFF_TILE):
                tile = textures[rng.integers(len(textures))].copy()
                gy, gx = (ty + yy) // acq_tile, (tx + xx) // acq_tile
                tile *= gains[np.minimum(gy, n_acq - 1), np.minimum(gx, n_acq - 1)]
                inside = (ty + yy - centre) ** 2 + (tx + xx - centre) ** 2 < radius**2
                tile[~inside] = 0
                yield np.clip(tile, 0, 255).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8,
                     tile=(TIFF_TILE, TIFF_TILE), photometric="rgb")


def write_annotation(path: Path, size: int) -> None:
    s = size
    benign = [[s * 0.2, s * 0.2], [s * 0.45, s * 0.2], [s * 0.45, s * 0.45], [s * 0.2, s * 0.45]]
    malignant = [[s * 0.5, s * 0.5], [s * 0.8, s * 0.5], [s * 0.8, s * 0.8], [s * 0.5, s * 0.8]]
    hole = [[s * 0.6, s * 0.6], [s * 0.7, s * 0.6], [s * 0.7, s * 0.7], [s * 0.6, s * 0.7]]

    def feature(rings, name):
        rings = [r + [r[0]] for r in rings]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "classification": {"name": name}}}

    path.write_text(json.dumps({"type": "FeatureCollection",
                                "features": [feature([benign], "Benign"),
                                             feature([malignant, hole], "Malignant")]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=21024)
    parser.add_argument("--acq-tile", type=int, default=1150)
    parser.add_argument("--workdir", type=Path, default=Path("bench_output/prepare"))
    parser.add_argument("--json", type=Path, default=None, help="Where to write the JSON figures.")
    parser.add_argument("--repeat", type=int, default=1, help="Time this many runs (best wall time reported).")
    args = parser.parse_args()

    slides = args.workdir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    slide = slides / "bench_slide.tif"
    t0 = time.perf_counter()
    if not slide.exists():
        write_slide(slide, args.size, args.acq_tile)
        write_annotation(slides / "bench_slide.geojson", args.size)
    t_write = time.perf_counter() - t0

    out = args.workdir / "dataset"
    cmd = [sys.executable, "-m", "diffusiondci.cli", "prepare", str(slides), "--out", str(out),
           "--preset", "paper", "--tile-size", str(args.acq_tile), "--val-fraction", "0",
           "--test-fraction", "0"]
    raw_mb = args.size * args.size * 3 / 2**20
    runs = []
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"prepare failed with exit status {os.waitstatus_to_exitcode(status)}")
        runs.append({"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                     "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_1min_before": round(load_before, 2)})
    best = min(runs, key=lambda r: r["wall_s"])
    meta = json.loads((out / "dataset.json").read_text())
    figures = {
        "slide_px": f"{args.size}x{args.size}",
        "raw_size_mb": round(raw_mb, 1),
        "slide_write_s": round(t_write, 1),
        "prepare_wall_s": best["wall_s"],
        "prepare_cpu_s": best["cpu_s"],
        "prepare_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_fraction_of_raw": round(max(r["peak_rss_mb"] for r in runs) / raw_mb, 3),
        "megapixels_per_s": round(args.size**2 / 1e6 / best["wall_s"], 1),
        "runs": runs,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "patches": meta["num_patches"],
        "preset": "paper (ROI 3450, stride 3450, patch 256)",
        "acquisition_tile": args.acq_tile,
    }
    for key, value in figures.items():
        print(f"{key:>28}: {value}")
    json_path = args.json or args.workdir / "prepare_slide.json"
    json_path.write_text(json.dumps(figures, indent=2))
    print(f"{'json':>28}: {json_path}")


if __name__ == "__main__":
    main()
