"""The feature probe (paper Fig. 3) and the ddpm-segmentation-style pixel-classifier baseline."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffusiondci.evaluation.probe as probe_mod
from diffusiondci.cli import app
from diffusiondci.config import build, load_section
from diffusiondci.errors import UserInputError
from diffusiondci.evaluation.probe import (
    PixelClassifier,
    ProbeConfig,
    fit_pixel_classifier,
    pixel_classifier_baseline,
    read_probe_csv,
    run_probe,
    summarize_probe,
)
from tests.test_dsdm import build_inputs, conditional_run

FAST = dict(blocks=[1, 4], timesteps=[100, 600], train_images=6, val_images=3, pixels_per_image=256,
            steps=15, batch_pixels=128, hidden=[16, 8], batch_size=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny MLPs gain nothing from threads on a shared CPU; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    inputs = build_inputs(base)
    return {"data": inputs["data"], "run": conditional_run(base, inputs)}


@pytest.fixture(scope="module")
def probed(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    cfg = build(ProbeConfig, load_section("tiny", "probe"), **FAST)
    result = run_probe(shared["data"], shared["run"], out, cfg, progress=False, device="cpu")
    return out, cfg, result


def test_presets_build():
    for preset in ("tiny", "paper"):
        cfg = build(ProbeConfig, load_section(preset, "probe"))
        assert cfg.blocks is None and cfg.timesteps is None and cfg.hidden == [128, 32]
    with pytest.raises(UserInputError):
        ProbeConfig(batch_pixels=1)


def test_fit_pixel_classifier_learns_separable_problem():
    gen = torch.Generator().manual_seed(0)

    def toy(n):
        # three classes split by two hyperplanes, in badly scaled, offset float16 features
        x = torch.randn(n, 8, generator=gen)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return (x * torch.tensor([50.0, 0.1, 1, 1, 1, 1, 1, 1]) + 7).half(), y

    feats, y = toy(3000)
    held_out, y_held = toy(2000)
    model = fit_pixel_classifier(feats, y, steps=200, lr=1e-2, seed=3, batch=512, hidden=[32, 16])
    assert isinstance(model, PixelClassifier) and not model.training
    assert (model.predict(held_out) == y_held).float().mean().item() > 0.95
    first, second = (fit_pixel_classifier(feats, y, steps=10, lr=1e-2, seed=3, batch=64) for _ in range(2))
    assert torch.equal(first.predict(held_out), second.predict(held_out))  # seeded
    with pytest.raises(ValueError):
        fit_pixel_classifier(feats, y[:-1])


def test_probe_outputs(probed):
    out, cfg, result = probed
    rows = read_probe_csv(out / "probe.csv")
    assert {(r["block"], r["timestep"]) for r in rows} == {(b, t) for b in cfg.blocks for t in cfg.timesteps}
    with (out / "probe.csv").open() as fh:
        assert next(csv.reader(fh)) == ["block", "timestep", "miou", "dice", "channels", "resolution"]
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["dice"] <= 1.0 and r["channels"] > 0
    assert (out / "probe_heatmap.png").stat().st_size > 1000
    saved = json.loads((out / "probe.json").read_text())
    assert saved["complete"] and saved["best"] == result["best"]
    best = max(rows, key=lambda r: r["miou"])
    assert (saved["best"]["block"], saved["best"]["timestep"]) == (best["block"], best["timestep"])
    assert saved["best"]["miou"] == pytest.approx(best["miou"])
    # rankings: block means over timesteps, timestep means over blocks
    for m in saved["top_blocks"]:
        assert m["mean_miou"] == pytest.approx(np.mean([r["miou"] for r in rows if r["block"] == m["block"]]))
    assert [m["mean_miou"] for m in saved["top_blocks"]] == sorted((m["mean_miou"] for m in saved["top_blocks"]),
                                                                    reverse=True)
    seg = saved["suggested_config"]["seg"]
    assert seg["blocks"] == sorted(m["block"] for m in saved["top_blocks"])
    assert seg["timesteps"] == [saved["top_timesteps"][0]["timestep"]]
    # channels / resolution are those of the DSDM's decoder taps
    from diffusiondci.diffusion.dsdm_run import load_dsdm

    shapes = load_dsdm(saved["settings"]["dsdm_run"], device="cpu")[0].decoder_feature_shapes
    for r in rows:
        c, h, w = shapes[r["block"]]
        assert (r["channels"], r["resolution"]) == (c, f"{h}x{w}")


def test_probe_resume_skips_finished_cells(probed, shared, monkeypatch):
    out, cfg, result = probed
    before = (out / "probe.csv").read_text()
    calls = []
    real_fit = probe_mod.fit_pixel_classifier

    def counting_fit(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "fit_pixel_classifier", counting_fit)
    again = run_probe(shared["data"], shared["run"], out, cfg, progress=False, device="cpu")
    assert calls == [] and again["best"] == result["best"]
    assert (out / "probe.csv").read_text() == before
    # a larger grid computes only the new cell
    bigger = ProbeConfig(**{**FAST, "blocks": [1, 4], "timesteps": [100, 600, 999]})
    calls.clear()
    run_probe(shared["data"], shared["run"], out, bigger, progress=False, device="cpu")
    assert len(calls) == 2 and len(read_probe_csv(out / "probe.csv")) == 6
    # other settings are refused rather than mixed into the same table
    with pytest.raises(UserInputError, match="other settings"):
        run_probe(shared["data"], shared["run"], out, ProbeConfig(**{**FAST, "steps": 3}), progress=False, device="cpu")


def test_summarize_probe_ranking():
    rows = [{"block": b, "timestep": t, "miou": m, "dice": m, "channels": 8, "resolution": "8x8"}
            for (b, t, m) in [(0, 1, 0.1), (0, 2, 0.2), (1, 1, 0.9), (1, 2, 0.3), (2, 1, 0.5), (2, 2, 0.6)]]
    s = summarize_probe(rows, top=2)
    assert (s["best"]["block"], s["best"]["timestep"]) == (1, 1)
    assert [m["block"] for m in s["top_blocks"]] == [1, 2]  # means 0.6, 0.55, 0.15
    assert [m["timestep"] for m in s["top_timesteps"]] == [1, 2]  # 0.5 vs 0.367
    assert s["suggested_config"] == {"seg": {"blocks": [1, 2], "timesteps": [1]}}


def test_pixel_classifier_baseline(shared):
    cfg = ProbeConfig(**{**FAST, "steps": 10})
    res = pixel_classifier_baseline(shared["data"], shared["run"], blocks=[1, 4], timesteps=[100, 300], cfg=cfg,
                                    split="val", max_images=4, ensemble=3, device="cpu")
    assert res["num_images"] > 0 and res["num_train_images"] == 4 and res["ensemble"] == 3
    assert 0.0 <= res["mean_iou"] <= 1.0 and 0.0 <= res["dataset"]["mean_iou"] <= 1.0
    assert np.asarray(res["confusion_matrix"]).sum() == res["num_images"] * 64 * 64


def test_cli_probe(shared, tmp_path):
    runner = CliRunner()
    helped = runner.invoke(app, ["probe", "--help"])
    assert helped.exit_code == 0 and "--dsdm" in helped.output
    out = tmp_path / "cli_probe"
    res = runner.invoke(app, ["probe", str(shared["data"]), "--dsdm", str(shared["run"]), "--out", str(out),
                              "--preset", "tiny", "--blocks", "2", "--timesteps", "200", "--steps", "5",
                              "--train-images", "3", "--val-images", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "best: block 2, timestep 200" in res.output and "seg:" in res.output
    assert len(read_probe_csv(out / "probe.csv")) == 1
    bad = runner.invoke(app, ["probe", str(shared["data"]), "--dsdm", str(shared["run"]), "--out", str(out),
                              "--preset", "tiny", "--blocks", "99", "--device", "cpu"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserInputError)
