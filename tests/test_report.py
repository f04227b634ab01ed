"""Tests of ``diffusiondci report``: a self-contained HTML page built from a fake run/experiment tree."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusiondci import cli
from diffusiondci.errors import UserInputError
from diffusiondci.evaluation.report import MAX_SIDE, render_report

SECTIONS = ["overview", "summary", "experiments", "metrics", "curves", "samples", "probe", "segmentation", "other",
            "runs", "warnings"]
#: Raw keys of the fixture's files: a reader sees them only inside folded <details> blocks.
RAW_KEYS = ["best.key", "train.kept_mask", "dataset.include_background", "max_steps", "confusion_matrix",
            "fraction_of_slide", "area_px2", "best_blocks", "dice_gain", "dice_wins", "lr=", "seed=", "per_image"]


def png(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> bytes:
    """A random RGB PNG (distinct bytes per seed); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path.read_bytes()


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def tree(tmp_path: Path) -> dict:
    """A small experiment folder with one of every file kind the report knows, plus traps."""
    root = tmp_path / "exp"
    blobs: dict[str, bytes] = {}
    write_json(root / "experiment.json", {"name": "label budget <pilot>", "settings": {"fractions": [0.1, 1.0]}})
    write_csv(root / "summary.csv", [
        {"method": "plain_unet", "fraction": 0.1, "dice_mean": 0.81234567, "dice_std": 0.0123, "n": 2},
        {"method": "dci", "fraction": 0.1, "dice_mean": 0.8535, "dice_std": 0.0101, "n": 2},
        {"method": "plain_unet", "fraction": 1.0, "dice_mean": 0.9, "dice_std": 0.01, "n": 2}])
    write_csv(root / "paired.csv", [{"method": "dci", "fraction": 0.1, "n": 2, "dice_gain_mean": 0.0412,
                                     "dice_gain_std": 0.0051, "dice_wins": "2/2"}])
    write_csv(root / "results.csv",
              [{"fraction": f, "seed": s, "dice": 0.8 + 0.01 * s} for f in (0.1, 1) for s in (0, 1)])
    blobs["plot"] = png(root / "label_budget.png", seed=1)

    run = root / "runs" / "seg_s0"
    write_json(run / "config.json", {"stage": "segment", "lr": 1e-4, "data": "/data/<glas>", "seed": 0})
    write_csv(run / "log.csv", [{"step": s, "epoch": 0, "loss": 1.0 / s, "grad_norm": 0.5, "val_miou": 0.1 * s,
                                 "wall_time": s} for s in range(1, 6)])
    write_json(run / "metrics.json", {"status": "completed", "step": 5, "max_steps": 5, "best": {"key": "dice"},
                                      "train": {"loss": 0.123456789, "kept_mask": 0.8}, "val": {},
                                      "dataset": {"include_background": False}})
    blobs["ckpt"] = png(run / "checkpoints" / "latest" / "weights_preview.png", seed=2)
    blobs["tb"] = png(run / "tb" / "x.png", seed=3)
    blobs["old_samples"] = png(run / "samples" / "step_2" / "samples.png", seed=4)
    blobs["new_samples"] = png(run / "samples" / "step_10" / "samples.png", seed=5)

    ev = root / "eval"
    sl = root / "slides"
    truth = np.zeros((30, 240), np.uint8)
    truth[5:25, 20:120], truth[5:25, 140:220] = 1, 2
    (root / "truth").mkdir()
    Image.fromarray(truth).save(root / "truth" / "slideA_mask.png")
    slide_rgb = np.full((60, 480, 3), 200, np.uint8)  # the slide segment read (outside the folder)
    (tmp_path / "inputs").mkdir()
    Image.fromarray(slide_rgb).save(tmp_path / "inputs" / "slideA.png")
    write_json(ev / "metrics.json", {
        "dice_per_class": [0.99, 0.7, None], "mean_dice": 0.845,
        "confusion_matrix": [[90, 5, 5], [3, 40, 7], [0, 0, 0]],
        "prediction_dir": str(sl), "truth_dir": str(root / "truth"),
        "per_image": [{"stem": "slideA", "prediction": "slideA_labels.png", "truth": "slideA_mask.png",
                       "mean_dice": 0.7654, "mean_iou": 0.6543, "dice_benign": 0.8, "dice_malignant": 0.6}]})
    write_csv(ev / "per_image.csv", [{"id": "img_7", "dice": 0.75}])
    blobs["confusion"] = png(ev / "confusion.png", seed=6)
    blobs["cases"] = png(ev / "cases.png", seed=7)

    pr = root / "probe"
    write_csv(pr / "probe.csv", [{"block": b, "timestep": t, "miou": 0.1 * b + 0.001 * t}
                                 for b in (0, 1) for t in (50, 200)])
    write_json(pr / "probe.json", {"best_blocks": [1], "best_timesteps": [200]})
    blobs["heatmap"] = png(pr / "probe_heatmap.png", seed=8)

    blobs["overlay"] = png(sl / "slideA_overlay.png", h=300, w=2400, seed=9)  # downscaled to MAX_SIDE
    write_json(sl / "slideA_areas.json", {  # the layout inference/slide.py writes
        "input": str(tmp_path / "inputs" / "slideA.png"), "settings": {"window": 64},
        "classes": {c: {"area_px2": 1000.0 * f, "fraction_of_slide": f}
                    for c, f in zip(("background", "benign", "malignant"), (0.5, 0.3, 0.2), strict=True)}})
    write_json(sl / "slideB_areas.json", {"background": 0.6, "benign": 0.4, "malignant": 0.0})  # flat, no overlay

    gen = root / "gen"
    blobs["sheet"] = png(gen / "contact_sheet.png", seed=10)
    blobs["progression"] = png(gen / "progression.png", seed=11)
    write_json(gen / "dataset.json", {"classes": ["background", "benign", "malignant"]})
    blobs["dataset_image"] = png(gen / "images" / "p0.png", seed=12)

    blobs["extra"] = png(root / "misc" / "extra.png", seed=13)
    Image.fromarray(np.repeat(np.arange(3, dtype=np.uint8), 20).reshape(3, 20)).save(root / "misc" / "label_mask.png")
    (root / "broken").mkdir()
    (root / "broken" / "corrupt.png").write_bytes(blobs["extra"][:60])  # truncated PNG
    (root / "broken" / "probe.json").write_text("{not json")
    return {"root": root, "blobs": blobs}


def sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="', page)[1:]
    return {p.split('"', 1)[0]: p for p in parts}


def unfolded(page: str) -> str:
    """What a reader sees without opening anything: the page less its style, pictures and <details>."""
    text = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    text = re.sub(r'src="[^"]*"', "", text)
    while True:  # innermost folds first
        text, n = re.subn(r"<details>(?:(?!<details>).)*?</details>", "", text, flags=re.S)
        if not n:
            return text


def test_report_is_self_contained_and_complete(tree: dict) -> None:
    root, blobs = tree["root"], tree["blobs"]
    out = render_report(root, title="Pilot <script>alert(1)</script>")
    assert out == root.resolve() / "report.html"
    page = out.read_text(encoding="utf-8")

    # self-contained: only data: images and in-page links, nothing external, no script
    assert not re.search(r"(?:https?|file)://", page)
    refs = re.findall(r'(src|href)="([^"]*)"', page)
    assert refs
    for attr, value in refs:
        assert value.startswith("data:image/png;base64,") if attr == "src" else value.startswith("#"), value
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "label budget &lt;pilot&gt;" in page

    # every section, in order
    found = sections(page)
    assert list(found) == SECTIONS
    starts = [page.index(f'<section id="{s}"') for s in SECTIONS]
    assert starts == sorted(starts)

    # the right pictures: shown where they belong, skipped folders and old samples left out
    for key, sid in [("plot", "summary"), ("new_samples", "samples"), ("sheet", "summary"),
                     ("progression", "samples"), ("confusion", "segmentation"), ("cases", "segmentation"),
                     ("heatmap", "probe"), ("extra", "other")]:
        assert b64(blobs[key]) in found[sid], key
    for key in ("ckpt", "tb", "old_samples", "dataset_image"):
        assert b64(blobs[key]) not in page, key
    sizes = []
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
            sizes.append(im.size)
    assert max(max(s) for s in sizes) == MAX_SIDE  # the 2400 px overlay, downscaled
    assert (MAX_SIDE, 200) in sizes
    assert 'src="data:image/png' in found["curves"]  # drawn from log.csv

    # the summary: best model, spread, paired gain, the slide's prediction next to its truth, samples
    summary = found["summary"]
    assert "Best: plain U-Net, fraction 1</b> — Dice 0.900 ± 0.010 over 2 seeds" in summary
    assert re.search(r"<td>dci</td><td>0.1</td><td class=\"num\">0.854 ± 0.010</td><td class=\"num\">2</td>"
                     r"<td class=\"num\">\+0.041 ± 0.005 \(better in 2 of 2 seeds\)</td>", summary)
    assert "slideA — Dice 0.765" in summary and '<div class="pair">' in summary
    assert 'alt="slideA_overlay.png"' in summary and "truth over the slide" in summary
    assert "slideA_overlay.png" not in found["segmentation"]  # not repeated below
    assert "Share of the slide: background 50.0 %, benign 30.0 %, malignant 20.0 %" in found["segmentation"]

    # tables: runs, mean ± std, 4 significant digits, per-class, probe grid, class areas
    assert "segment" in found["runs"] and "5 / 5" in found["runs"] and "&lt;glas&gt;" in found["runs"]
    assert "dice (mean ± std)" in found["experiments"] and "0.8123 ± 0.0123" in found["experiments"]
    assert "dice_gain (mean ± std)" in found["experiments"]
    assert "0.0412 ± 0.0051" in found["experiments"]
    assert "2/2" in found["experiments"]
    assert "<details>" in found["experiments"] and "raw results" in found["experiments"]
    assert "0.1235" in found["metrics"] and "0.123456789" not in found["metrics"]
    assert re.search(r"<td>dice</td><td class=\"num\">0.99</td><td class=\"num\">0.7</td><td>—</td>", found["metrics"])
    assert "per-image scores" in found["metrics"] and "<td>val</td>" not in found["metrics"]
    assert "label mask: blue background" in found["other"]  # 0/1/2 label image shown in colour
    assert re.search(r'<td class="num best">0.3</td>', found["probe"])  # block 1, t=200: best mIoU
    assert re.search(r"<td>fraction_of_slide</td><td[^>]*>0.5 \(50.0 %\)</td><td[^>]*>0.3 \(30.0 %\)",
                     found["segmentation"])
    assert re.search(r"<td>area_px2</td><td[^>]*>500</td>", found["segmentation"])
    assert "slideB" in found["segmentation"] and "0.4 (40.0 %)" in found["segmentation"]

    # corrupt files are warnings, not crashes
    assert "broken/corrupt.png" in found["warnings"] and "broken/probe.json" in found["warnings"]


def test_summary_leads_and_raw_keys_are_folded(tree: dict) -> None:
    page = render_report(tree["root"]).read_text(encoding="utf-8")
    # the answer comes first: the comparison table precedes every folded raw-settings block and section
    table_at = page.index('<table class="summary">')
    assert table_at < page.index("<details>") and table_at < page.index('<section id="experiments"')
    assert page.index('<section id="summary"') < page.index('<section id="runs"')
    # raw keys of the folder's files are shown only inside <details>
    seen = unfolded(page)
    for key in RAW_KEYS:
        assert key in page, key  # the fixture does hold it ...
        assert key not in seen, key  # ... but folded


def seg_run(root: Path, name: str, seed: int, dice: float, caa: bool) -> None:
    """A finished train-seg run folder: config.json, test_metrics.json and log.csv."""
    run = root / name
    write_json(run / "config.json", {"stage": "seg", "data": "/data/glas", "injection": "caa" if caa else "none",
                                     "init": "dsdm" if caa else "scratch", "synthetic": "/syn" if caa else None,
                                     "synthetic_ratio": 0.5 if caa else 0.0, "labelled": None, "label_seed": 0,
                                     "lr": 1e-3, "seed": seed})
    write_json(run / "test_metrics.json", {"mean_dice": dice, "mean_iou": dice - 0.1, "num_images": 8})
    write_csv(run / "log.csv", [{"step": s, "loss": 1.0 / s, "val_dice": dice * s / 5} for s in range(1, 6)])


def test_summary_compares_segmentation_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (dci, plain) in enumerate([(0.80, 0.76), (0.84, 0.78)]):
        seg_run(root, f"caa_s{seed}", seed, dci, caa=True)
        seg_run(root, f"plain_s{seed}", seed, plain, caa=False)
    page = render_report(root).read_text(encoding="utf-8")
    summary = sections(page)["summary"]
    assert ("Best: DiffusionDCI (CAA + synthetic pairs)</b> — Dice 0.820 ± 0.020 over 2 seeds, mIoU 0.720 ± 0.020; "
            "+0.050 Dice over the plain U-Net of the same seed (better in 2 of 2 seeds).") in summary
    assert re.search(r'<tr class="best"><td>DiffusionDCI \(CAA \+ synthetic pairs\)</td><td class="num">0.820 ± 0.020'
                     r'</td><td class="num">0.720 ± 0.020</td><td class="num">2</td><td class="num">\+0.050 ± 0.010 '
                     r"\(better in 2 of 2 seeds\)</td>", summary)
    assert re.search(r"<tr><td>plain U-Net</td><td class=\"num\">0.770 ± 0.010</td>", summary)
    assert 'alt="training curves of the compared runs"' in summary
    seen = unfolded(page)
    for key in ("injection", "synthetic_ratio", "label_seed", "mean_dice", "lr="):
        assert key not in seen, key


def test_empty_folder_and_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = render_report(tmp_path / "empty", out=tmp_path / "r" / "empty.html")
    page = out.read_text()
    assert "Nothing recognisable" in page and list(sections(page)) == ["overview"]
    with pytest.raises(UserInputError, match="not found"):
        render_report(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserInputError, match="not a folder"):
        render_report(tmp_path / "f.txt")


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["diffusiondci", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli(tree: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    target = tmp_path / "out" / "r.html"
    code, out, _ = run_cli(["report", tree["root"], "--out", target, "--title", "CLI title"], monkeypatch, capsys)
    assert code == 0 and out.strip() == str(target) and "<title>CLI title</title>" in target.read_text()
    code, _, err = run_cli(["report", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code == 2 and "nowhere" in err


def _browser() -> str | None:
    return next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium / chromium-browser / google-chrome on PATH")
def test_renders_in_headless_chromium(tree: dict, tmp_path: Path) -> None:
    out = render_report(tree["root"], title="Headless check")
    shot = tmp_path / "shot.png"
    env = {**os.environ, "HOME": str(tmp_path)}
    cmd = [_browser(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000",
           f"--screenshot={shot}", "--dump-dom", out.as_uri()]  # one browser start does both
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert "<title>Headless check</title>" in res.stdout and 'id="segmentation"' in res.stdout
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert pixels.std() > 10 and len(colours) > 100  # text and pictures were drawn, not a blank page
