"""The demo runs the whole pipeline end to end (tiny budgets here) and ends with the report."""

from __future__ import annotations

import json

from diffusiondci.demo import DemoConfig, run_demo


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
