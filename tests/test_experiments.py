"""Every experiment runs end to end at the tiny preset with minimal budgets, and resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from diffusiondci.config import build, load_section
from diffusiondci.errors import UserInputError
from diffusiondci.evaluation.experiments import EXPERIMENTS, ExperimentConfig, paired_gain, run_experiment, summarize
from tests.test_dsdm import build_inputs, conditional_run

MINIMAL = dict(seeds=[0], encoder_steps=1, dsdm_steps=1, seg_steps=1, sample_steps=2, n_eval=4, diversity_masks=2,
               diversity_samples=2, ratios=[0.0, 0.5], budgets=[4, 0], label_unit="patch", probe_steps=2,
               probe_blocks=[1, 2], probe_timesteps=[100, 500], monai_steps=2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    inputs = build_inputs(base)
    return {**inputs, "dsdm": conditional_run(base, inputs), "assets": tmp_path_factory.mktemp("exp_assets")}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_summary_is_mean_and_std_over_seeds():
    data = [{"m": "a", "mean_dice": 0.5}, {"m": "a", "mean_dice": 0.7}, {"m": "b", "mean_dice": 0.1}]
    out = {r["m"]: r for r in summarize(data, ["m"], ("mean_dice",))}
    assert out["a"]["mean_dice_mean"] == pytest.approx(0.6) and out["a"]["mean_dice_std"] == pytest.approx(0.1)
    assert out["b"]["n"] == 1 and out["b"]["mean_dice_std"] == 0.0


def test_paired_gain_compares_runs_of_the_same_seed_and_budget():
    def r(m, budget, seed, dice):
        return {"m": m, "budget": budget, "seed": seed, "mean_dice": dice}

    data = [r("plain", "8", 0, 0.30), r("plain", "8", 1, 0.50), r("dci", "8", 0, 0.35), r("dci", "8", 1, 0.45),
            r("dci", "8", 2, 0.90),  # no plain run of seed 2: not paired
            r("plain", "all", 0, 0.10), r("dci", "all", 0, 0.20)]
    out = {(g["m"], g["budget"]): g for g in paired_gain(data, "m", "plain", within=("budget",), metrics=("mean_dice",))}
    assert set(out) == {("dci", "8"), ("dci", "all")}
    assert out[("dci", "8")]["n"] == 2 and out[("dci", "8")]["mean_dice_wins"] == "1/2"
    assert out[("dci", "8")]["mean_dice_gain_mean"] == pytest.approx(0.0)
    assert out[("dci", "8")]["mean_dice_gain_std"] == pytest.approx(0.05)
    assert out[("dci", "all")]["mean_dice_gain_mean"] == pytest.approx(0.1)
    assert out[("dci", "all")]["mean_dice_wins"] == "1/1"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_end_to_end(name, shared, tmp_path, monkeypatch):
    cfg = build(ExperimentConfig, load_section("tiny", "experiment"), **MINIMAL)
    reuse = {} if name in ("table1", "table2", "label-budget") else {"dsdm": shared["dsdm"]}
    out = run_experiment(name, shared["data"], tmp_path / name, "tiny", cfg, encoder=shared["encoder"],
                         assets=shared["assets"], log=lambda m: None, **reuse)
    record = json.loads((out / "experiment.json").read_text())
    assert record["name"] == name and record["settings"]["seeds"] == [0]
    if name == "fig3":
        assert (out / "probe_heatmap.png").is_file() and (out / "probe.csv").is_file()
        return
    results, summary = rows(out / "results.csv"), rows(out / "summary.csv")
    assert results and summary and all(r["n"] == "1" for r in summary)
    assert list(out.glob("*.png")), "a plot is written"
    if name == "fig6":
        assert sorted(float(r["ratio"]) for r in summary) == [0.0, 0.5]
    if name == "label-budget":
        methods = {(r["method"], r["labelled"]) for r in summary}
        assert ("plain_unet", "4") in methods and ("dci_with_unlabelled_synthetic", "4") in methods
        assert ("dci_labelled_only", "all") in methods
        gains = {(r["method"], r["labelled"]) for r in rows(out / "paired.csv")}
        assert gains == methods - {("plain_unet", "4"), ("plain_unet", "all")}
        assert ("monai_unet", "4") in methods and ("monai_unet", "all") in methods
        vs_monai = {(r["method"], r["labelled"]) for r in rows(out / "paired_vs_monai.csv")}
        assert vs_monai == {m for m in methods if m[0] not in ("plain_unet", "monai_unet")}
        monai_runs = list((shared["assets"] / "monai_runs").glob("monai_unet_n4_s0_*/scores.json"))
        assert len(monai_runs) == 1 and json.loads(monai_runs[0].read_text())["record"]["steps"] == 2
    if name in ("table1", "table2"):
        assert all(r["fd_encoder_mean"] for r in summary) and all(r["miou_generated_mean"] for r in summary)
        assert all(r["fd_encoder_real_mean"] for r in summary) and all(r["miou_real_mean"] for r in summary)
        assert all(r["fd_pca_mean"] for r in summary) and all(r["fd_pca_real_mean"] for r in summary)
    # resume: a rerun reuses every finished run and gives the same table
    before = (out / "results.csv").read_text()
    run_experiment(name, shared["data"], out, "tiny", cfg, encoder=shared["encoder"], assets=shared["assets"],
                   log=lambda m: None, **reuse)
    assert (out / "results.csv").read_text() == before


def test_changed_settings_are_refused(shared, tmp_path):
    cfg = build(ExperimentConfig, load_section("tiny", "experiment"), **MINIMAL)
    out = tmp_path / "t5"
    run_experiment("table5", shared["data"], out, "tiny", cfg, dsdm=shared["dsdm"], encoder=shared["encoder"],
                   assets=shared["assets"], log=lambda m: None)
    other = build(ExperimentConfig, load_section("tiny", "experiment"), **{**MINIMAL, "seg_steps": 2})
    with pytest.raises(UserInputError, match="other settings"):
        run_experiment("table5", shared["data"], out, "tiny", other, dsdm=shared["dsdm"], log=lambda m: None)
    with pytest.raises(UserInputError, match="unknown experiment"):
        run_experiment("table9", shared["data"], out, "tiny", cfg)


def test_runs_with_the_same_settings_are_shared_between_experiments(tmp_path, monkeypatch):
    """Two experiments asking for a segmenter with identical settings get one run folder, whatever
    they call it; other settings get another one."""
    from diffusiondci.evaluation import experiments

    trained: list[Path] = []

    def fake_ensure_seg(data, run, *args, **kw):
        if not run.is_dir():
            run.mkdir(parents=True)
            trained.append(run)
        return {"mean_dice": 0.5}

    monkeypatch.setattr(experiments, "ensure_seg", fake_ensure_seg)
    data, cfg, assets = tmp_path / "data", ExperimentConfig(seg_steps=3), tmp_path / "assets"
    first = experiments._Ctx("table5", data, tmp_path / "t5", assets, "tiny", cfg, log=lambda m: None)
    second = experiments._Ctx("label-budget", data, tmp_path / "lb", assets, "tiny", cfg, log=lambda m: None)
    first.seg("plain_unet_s0", dsdm=None, injection="none", init="scratch", seed=0)
    second.seg("plain_unet_nall_s0", dsdm=None, injection="none", init="scratch", seed=0)
    assert len(trained) == 1
    assert (tmp_path / "lb" / "runs" / "plain_unet_nall_s0").resolve() == trained[0].resolve()
    second.seg("plain_unet_nall_s1", dsdm=None, injection="none", init="scratch", seed=1)
    assert len(trained) == 2 and trained[1].name.startswith("plain_unet_nall_s1_")


def test_label_budget_trains_only_the_methods_asked_for(tmp_path, monkeypatch):
    """experiment.budget_methods: the plain U-Net (the paired baseline) and the named methods are
    trained, no other segmenter or DSDM; the rows carry the pooled (dataset-level) Dice too."""
    from types import SimpleNamespace

    from diffusiondci.data import patch_dataset
    from diffusiondci.evaluation import experiments

    trained: list[str] = []
    dsdms: list[str] = []
    fake_train = SimpleNamespace(ids=[f"p{i}" for i in range(6)], groups=[f"s{i}" for i in range(6)])
    monkeypatch.setattr(patch_dataset, "PatchDataset", lambda *a, **k: fake_train)
    monkeypatch.setattr("diffusiondci.train.seg_data.labelled_groups", lambda ds, unit: ds.groups)
    monkeypatch.setattr(experiments, "labelled_view", lambda data, out, n, seed, unit: (out, ["p0", "p1"]))
    monkeypatch.setattr(experiments, "augmented_masks", lambda *a, **k: tmp_path / "masks")
    monkeypatch.setattr(experiments, "ensure_samples", lambda *a, **k: tmp_path / "synth")
    monkeypatch.setattr(experiments._Ctx, "encoder_run", lambda self: tmp_path / "enc")
    monkeypatch.setattr(experiments._Ctx, "dsdm_variant", lambda self, name, *a, **k: dsdms.append(name) or tmp_path)

    def fake_seg(self, name, **kw):
        trained.append(name)
        return {"mean_dice": 0.5, "mean_iou": 0.4, "dataset": {"mean_dice": 0.6, "mean_iou": 0.45}}

    monkeypatch.setattr(experiments._Ctx, "seg", fake_seg)
    cfg = ExperimentConfig(seeds=[0], budgets=[2], budget_methods=["dci_with_unlabelled_synthetic"])
    ctx = experiments._Ctx("label-budget", tmp_path, tmp_path / "lb", tmp_path / "assets", "tiny", cfg,
                           log=lambda m: None)
    ctx.out.mkdir()
    experiments.label_budget(ctx)
    assert [n.split("_n")[0] for n in trained] == ["plain_unet", "dci_with_unlabelled_synthetic"]
    assert len(dsdms) == 1 and "unl" in dsdms[0]
    got = rows(tmp_path / "lb" / "results.csv")
    assert {r["method"] for r in got} == {"plain_unet", "dci_with_unlabelled_synthetic"}
    assert all(float(r["dataset_dice"]) == 0.6 for r in got)
    assert not (tmp_path / "lb" / "paired_vs_monai.csv").exists()

    # asking for the MONAI reference trains it on the same view, and pairs the others with it too
    monai: list[tuple[str, Path, int]] = []

    def fake_monai(self, name, data, seed):
        monai.append((name, data, seed))
        return {"mean_dice": 0.45, "mean_iou": 0.3, "dataset": {"mean_dice": 0.5, "mean_iou": 0.35}}

    monkeypatch.setattr(experiments._Ctx, "monai", fake_monai)
    trained.clear()
    cfg = ExperimentConfig(seeds=[0], budgets=[2], budget_methods=["dci_with_unlabelled", "monai_unet"])
    ctx = experiments._Ctx("label-budget", tmp_path, tmp_path / "lb2", tmp_path / "assets", "tiny", cfg,
                           log=lambda m: None)
    ctx.out.mkdir()
    experiments.label_budget(ctx)
    assert [n.split("_n")[0] for n in trained] == ["plain_unet", "dci_with_unlabelled"]
    assert monai == [("monai_unet_n2_s0", tmp_path / "lb2" / "views" / "n2_s0", 0)]
    vs = rows(tmp_path / "lb2" / "paired_vs_monai.csv")
    assert [r["method"] for r in vs] == ["dci_with_unlabelled"]
    assert float(vs[0]["dataset_dice_gain_mean"]) == pytest.approx(0.1) and vs[0]["dataset_dice_wins"] == "1/1"
    with pytest.raises(UserInputError, match="budget_methods"):
        ExperimentConfig(budget_methods=["dci_everything"])
    with pytest.raises(UserInputError, match="monai_steps"):
        ExperimentConfig(monai_steps=0)


def test_experiment_samples_use_ddim_whatever_the_preset_sampler(tmp_path, monkeypatch):
    """The tiny preset's `sample` default is 25-step SDE DPM-Solver++ on Karras sigmas; synthetic pairs
    of experiments and the demo keep DDIM at their own step count (what their figures were measured with)."""
    import diffusiondci.diffusion.pipeline as pipeline
    from diffusiondci.evaluation.experiment_runs import ensure_samples

    assert load_section("tiny", "sample")["sampler"] == "dpmpp_sde_karras"
    seen = []
    monkeypatch.setattr(pipeline, "sample_to_folder", lambda dsdm, masks, out, cfg, **kw: seen.append(cfg))
    ensure_samples(tmp_path / "dsdm", tmp_path / "data", tmp_path / "out", "tiny", 10, log=lambda m: None)
    assert [(c.sampler, c.steps) for c in seen] == [("ddim", 10)]


def test_pseudo_layouts_are_the_segmenters_masks_of_unannotated_patches(tmp_path_factory, tmp_path, monkeypatch):
    """pseudo_layouts: `count` seeded unannotated training patches, each with the mask the segmenter
    predicts for *that* patch (here: the argmax of its RGB channels), as a dataset whose paired
    references are the real patches; finished folders are reused without predicting again."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from diffusiondci.data.imageio import read_mask, read_rgb
    from diffusiondci.data.patch_dataset import read_manifest
    from diffusiondci.diffusion.sample_inputs import read_sources
    from diffusiondci.evaluation.experiment_runs import labelled_view, pseudo_layouts
    from diffusiondci.segmentation import run as seg_run

    calls = []

    def fake_load(run_dir, device=None, **kw):
        calls.append(Path(run_dir))
        return SimpleNamespace(checkpoint=Path(run_dir) / "best", predict=lambda x: x.clone())  # logits = RGB

    monkeypatch.setattr(seg_run, "load_segmenter", fake_load)
    data = build_inputs(tmp_path_factory.getbasetemp() / "dsdm_shared")["data"]  # no DSDM needed
    view, chosen = labelled_view(data, tmp_path / "view", 2, 0, "patch")
    rows = read_manifest(view)
    pool = {r["id"] for r in rows if r["split"] == "train" and r["labelled"] == "0"}
    assert len(pool) > 3 and not pool & set(chosen)

    out = pseudo_layouts(tmp_path / "seg", view, tmp_path / "layouts", 3, seed=5)
    got = read_manifest(out)
    assert len(got) == 3 and {r["id"] for r in got} <= pool
    assert all(r["labelled"] == "1" and r["split"] == "train" for r in got)
    for r in got:
        rgb = read_rgb(view / "images" / f"{r['id']}.png")
        want = torch.from_numpy(rgb.astype(np.float32)).argmax(-1).numpy().astype(np.uint8)
        mask = read_mask(out / "masks" / f"{r['id']}.png")
        assert np.array_equal(mask, want)
        assert float(r["frac_malignant"]) == pytest.approx(float((want == 2).mean()), abs=1e-4)
    sources, meta = read_sources(out, int(got[0]["patch_size"]), "train")
    assert [s.image_path.resolve() for s in sources] == [(view / "images" / f"{r['id']}.png").resolve() for r in got]
    assert meta["pseudo_layouts"]["count"] == 3 and meta["pseudo_layouts"]["seed"] == 5

    assert pseudo_layouts(tmp_path / "seg", view, out, 3, seed=5) == out and len(calls) == 1  # reused
    again = pseudo_layouts(tmp_path / "seg", view, tmp_path / "layouts2", 3, seed=5)
    assert [r["id"] for r in read_manifest(again)] == [r["id"] for r in got]  # seeded
    everything = pseudo_layouts(tmp_path / "seg", view, tmp_path / "all", 10_000, seed=5)
    assert {r["id"] for r in read_manifest(everything)} == pool
    with pytest.raises(UserInputError, match="unlabelled"):
        pseudo_layouts(tmp_path / "seg", data, tmp_path / "none", 3)


def test_label_budget_pseudo_pairs_come_from_the_labellers_masks(tmp_path, monkeypatch):
    """dci_with_unlabelled_pseudo: the dci_with_unlabelled segmenter labels ratio x N unannotated
    patches, the DSDM renders them, and a CAA segmenter trains with those pairs; not in the defaults."""
    from types import SimpleNamespace

    from diffusiondci.data import patch_dataset
    from diffusiondci.evaluation import experiments

    trained: list[tuple[str, dict]] = []
    layouts: list[tuple] = []
    samples: list[tuple] = []
    fake_train = SimpleNamespace(ids=[f"p{i}" for i in range(6)], groups=[f"s{i}" for i in range(6)])
    monkeypatch.setattr(patch_dataset, "PatchDataset", lambda *a, **k: fake_train)
    monkeypatch.setattr("diffusiondci.train.seg_data.labelled_groups", lambda ds, unit: ds.groups)
    monkeypatch.setattr(experiments, "labelled_view", lambda data, out, n, seed, unit: (out, ["p0", "p1", "p2"]))
    monkeypatch.setattr(experiments, "pseudo_layouts",
                        lambda seg, view, out, count, seed: layouts.append((seg, view, count, seed)) or out)
    monkeypatch.setattr(experiments, "ensure_samples",
                        lambda dsdm, masks, out, *a, **k: samples.append((masks, k["split"])) or out)
    monkeypatch.setattr(experiments._Ctx, "encoder_run", lambda self: tmp_path / "enc")
    monkeypatch.setattr(experiments._Ctx, "dsdm_variant", lambda self, name, *a, **k: tmp_path / name)

    def fake_seg(self, name, **kw):
        trained.append((name, kw))
        return {"mean_dice": 0.5, "mean_iou": 0.4, "dataset": {"mean_dice": 0.6, "mean_iou": 0.45}}

    monkeypatch.setattr(experiments._Ctx, "seg", fake_seg)
    cfg = ExperimentConfig(seeds=[1], budgets=[3], budget_methods=["dci_with_unlabelled_pseudo"],
                           budget_synthetic_ratio=2.0)
    ctx = experiments._Ctx("label-budget", tmp_path, tmp_path / "lb", tmp_path / "assets", "tiny", cfg,
                           log=lambda m: None)
    ctx.out.mkdir()
    experiments.label_budget(ctx)
    assert [n for n, _ in trained] == ["plain_unet_n3_s1", "dci_with_unlabelled_n3_s1",
                                       "dci_with_unlabelled_pseudo_n3_s1"]
    view = tmp_path / "lb" / "views" / "n3_s1"
    assert layouts == [(ctx.run("dci_with_unlabelled_n3_s1").resolve(), view, 6, 1)]
    assert samples == [(tmp_path / "assets" / "pseudo_n3_s1_slide_r2", "train")]
    kw = trained[-1][1]
    assert kw["synthetic"].name.startswith("synth_pseudo_n3_s1") and kw["synthetic_ratio"] == 2.0
    assert kw["dsdm"] == tmp_path / "dsdm_n3_s1_unl" and kw["injection"] == "caa"
    assert {r["method"] for r in rows(tmp_path / "lb" / "results.csv")} == {"plain_unet", "dci_with_unlabelled_pseudo"}
    assert "dci_with_unlabelled_pseudo" not in experiments.DEFAULT_BUDGET_METHODS
