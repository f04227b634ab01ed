"""The demo runs the whole pipeline end to end (tiny budgets here) and ends with the report."""

from __future__ import annotations

import json

import numpy as np

from diffusiondci.demo import DemoConfig, cast_size, demo_results, results_lines, run_demo


def test_demo_end_to_end(tmp_path):
    cfg = DemoConfig(slides=4, slide_size=384, encoder_steps=1, dsdm_steps=1, sample_steps=2, seg_steps=1,
                     synthetic_ratio=0.5, baseline=False)
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", cfg=cfg, log=lines.append)
    assert report.is_file() and report.read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "demo"
    labels = list((out / "segmentation").glob("*_labels.png"))
    assert labels and (out / "evaluation" / "metrics.json").is_file()
    assert json.loads((out / "runs" / "segmenter" / "synthetic.json").read_text())["used"] > 0
    assert lines[-1].startswith("  report:")
    assert any("$ diffusiondci train-seg" in line for line in lines)
    # resumable: a second run reuses everything and is quick
    run_demo(out, cfg=cfg, log=lambda m: None)
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results["slides"]) == {"with colour normalisation", "without colour normalisation"}
    assert "What the demo shows" in report.read_text()
    assert "/255 on average" in results["findings"][-1]  # the test slide's casts, measured against its clean twin


def test_cast_size(tmp_path):
    from diffusiondci.data.imageio import write_png_atomic

    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[:4] += 8  # half the pixels 8 higher in every channel
    write_png_atomic(tmp_path / "a.png", a)
    write_png_atomic(tmp_path / "b.png", b)
    assert cast_size(tmp_path / "b.png", tmp_path / "a.png") == 4.0
    assert cast_size(tmp_path / "b.png", tmp_path / "missing.png") is None


def _scores(image: float, pooled: float) -> dict:
    return {"mean_dice": image, "mean_iou": image - 0.1, "dataset": {"mean_dice": pooled, "mean_iou": pooled - 0.1},
            "wall_s": 120.0}


def test_demo_findings_say_who_wins_and_why_not():
    cfg = DemoConfig(dsdm_steps=500)
    slide, raw = {"mean_dice": 0.90, "mean_iou": 0.8}, {"mean_dice": 0.85, "mean_iou": 0.75}
    win = demo_results({"DCI": _scores(0.8, 0.82), "plain U-Net": _scores(0.78, 0.79)}, slide, raw, cfg)
    assert win["findings"][0].startswith("DCI beats the plain U-Net by 0.030")
    assert win["findings"][1].startswith("Colour normalisation raises")
    assert win["patches"]["DCI"]["dataset_dice"] == 0.82

    lose = demo_results({"DCI": _scores(0.8, 0.75), "plain U-Net": _scores(0.78, 0.79)}, raw, slide, cfg, casts=6.25)
    assert "loses to (-0.040)" in lose["findings"][0] and "500 steps" in lose["findings"][0]
    assert "lowers" in lose["findings"][1] and "(-0.050)" in lose["findings"][1] and "6.2/255" in lose["findings"][1]
    edge = demo_results({"DCI": _scores(0.8, 0.7801), "plain U-Net": _scores(0.78, 0.79)}, slide, slide, cfg)
    assert "loses to (-0.010)" in edge["findings"][0]  # judged on the printed (rounded) difference
    level = demo_results({"DCI": _scores(0.8, 0.785), "plain U-Net": _scores(0.78, 0.79)}, slide, slide, cfg)
    assert "is level with" in level["findings"][0] and "does not change" in level["findings"][1]
    lines = results_lines(lose)
    assert lines[1].split()[-4:] == ["0.800", "0.750", "0.700", "2.0"]


def test_report_shows_demo_results(tmp_path):
    from diffusiondci.evaluation.report import render_report

    cfg = DemoConfig()
    results = demo_results({"DCI": _scores(0.8, 0.75), "plain U-Net": _scores(0.78, 0.79)},
                           {"mean_dice": 0.9, "mean_iou": 0.8}, {"mean_dice": 0.85, "mean_iou": 0.75}, cfg)
    (tmp_path / "demo_results.json").write_text(json.dumps(results))
    html = render_report(tmp_path).read_text()
    assert "What the demo shows" in html and "test patches: DCI" in html and "loses to" in html
    (tmp_path / "demo_results.json").write_text('{"patches": 3}')
    html = render_report(tmp_path).read_text()
    assert "What the demo shows" not in html and "not a demo results file" in html
