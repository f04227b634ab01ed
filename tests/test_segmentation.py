"""The segmentation stage: feature extraction without leakage, DSDM initialisation, injection variants,
synthetic mixing, the label budget and the train-seg command."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusiondci.cli import app
from diffusiondci.config import build, load_section
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.diffusion.dsdm_run import load_dsdm
from diffusiondci.errors import UserInputError
from diffusiondci.models.segmenter import Segmenter, init_from_dsdm, segmenter_unet_config
from diffusiondci.models.unet import DSDMUNet
from diffusiondci.segmentation.features import DiffusionFeatureExtractor, paper_probe_timesteps
from diffusiondci.segmentation.run import load_segmenter
from diffusiondci.train.seg_config import SegConfig
from diffusiondci.train.seg_data import choose_labelled, synthetic_subset
from diffusiondci.train.segmentation import train_seg
from tests.test_dsdm import build_inputs, conditional_run


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    inputs = build_inputs(base)
    return {**inputs, "dsdm": conditional_run(base, inputs)}


def seg_cfg(**kw) -> SegConfig:
    base = dict(steps=2, batch_size=4, blocks=[1, 2], timesteps=[50, 300], log_every=1, ckpt_every=2, val_every=2)
    base.update(kw)
    return build(SegConfig, load_section("tiny", "seg"), **base)


@pytest.fixture(scope="module")
def caa_run(shared, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seg") / "caa"
    train_seg(shared["data"], run, seg_cfg(), dsdm_run=shared["dsdm"], progress=False)
    return run


def test_probe_grid_is_the_papers():
    assert paper_probe_timesteps(1000) == [100, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def test_features_never_see_a_mask(shared, monkeypatch):
    """The frozen DSDM gets the NULL mask (None) and the image's own reference, nothing else."""
    fx = DiffusionFeatureExtractor.from_run(shared["dsdm"], blocks=[1, 3], timesteps=[10, 500])
    seen = []
    original = DSDMUNet.forward

    def spy(self, x_t, t, mask=None, ref=None, **kw):
        seen.append((mask, ref))
        return original(self, x_t, t, mask=mask, ref=ref, **kw)

    monkeypatch.setattr(DSDMUNet, "forward", spy)
    images = torch.stack([PatchDataset(shared["data"])[i]["image"] for i in range(3)])
    feats = fx(images)
    assert len(seen) == 2 and all(m is None for m, _ in seen)
    assert torch.allclose(seen[0][1], fx.encoder(images))
    shapes = fx.dsdm.decoder_feature_shapes
    assert feats[1].shape == (3, 2 * shapes[1][0], shapes[1][1], shapes[1][2])
    again = fx(images)
    assert all(torch.equal(feats[b], again[b]) for b in feats)  # seeded noise: reproducible


def test_changing_the_true_mask_cannot_change_the_prediction(shared, caa_run, tmp_path):
    """Leakage test: rewrite every test mask with garbage labels; predictions are bit-identical."""
    data = tmp_path / "data"
    shutil.copytree(shared["data"], data)
    run = load_segmenter(caa_run, device="cpu")
    ds = PatchDataset(data, splits=("test",), cache=False)
    before = run.predict(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        Image.fromarray(rng.integers(0, 3, (64, 64), dtype=np.uint8)).save(ds.mask_path(i))
    ds2 = PatchDataset(data, splits=("test",), cache=False)
    after = run.predict(torch.stack([ds2[i]["image"] for i in range(len(ds2))]))
    assert torch.equal(before, after)


def test_initialisation_copies_dsdm_tensors(shared):
    dsdm, _, _ = load_dsdm(shared["dsdm"], device="cpu")
    seg = Segmenter(segmenter_unet_config(dsdm.config), "caa", {2: 64}, kv_size=8)
    report = init_from_dsdm(seg, dsdm.state_dict())
    state = seg.unet.state_dict()
    assert report["counts"]["loaded"] > 50
    for key in ("conv_in.conv.weight", "down_blocks.0.resnets.0.conv1.conv.weight", "decoder_blocks.3.resnet.conv2.conv.weight"):
        assert key in report["loaded"] and torch.equal(state[key], dsdm.state_dict()[key])
    assert any(k.startswith("out.2.") for k in (r.split(":")[0] for r in report["reshaped"]))  # 6 -> 3 channel head
    assert any("mcaa" in k or "norm1.mlp" in k for k in report["unused"])  # SPADE / MCAA have no place
    assert any(k.startswith("inject.") for k in report["new"])


@pytest.mark.parametrize("injection", ["none", "skip", "caa"])
def test_each_injection_overfits_a_batch(shared, injection):
    fx = DiffusionFeatureExtractor.from_run(shared["dsdm"], blocks=[1, 2], timesteps=[100])
    torch.manual_seed(0)
    seg = Segmenter(segmenter_unet_config(fx.dsdm.config), injection,
                    fx.feature_channels() if injection != "none" else None, kv_size=8)
    ds = PatchDataset(shared["data"])
    x = torch.stack([ds[i]["image"] for i in range(4)])[..., 16:48, 16:48]  # 32 px crops: fast
    y = torch.stack([ds[i]["mask"] for i in range(4)])[..., 16:48, 16:48]
    feats = fx(x) if injection != "none" else None
    opt = torch.optim.Adam(seg.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(seg(x, feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::5]


def test_train_seg_run_folder(caa_run):
    record = json.loads((caa_run / "segmenter.json").read_text())
    assert record["injection"] == "caa" and record["blocks"] == [1, 2] and record["timesteps"] == [50, 300]
    assert record["data"]["color_norm"]["enabled"] and record["data"]["roi_size"] == 192
    assert (caa_run / "checkpoints" / "best").is_dir() and (caa_run / "init_report.json").is_file()
    metrics = json.loads((caa_run / "test_metrics.json").read_text())
    assert 0 <= metrics["mean_dice"] <= 1 and metrics["split"] == "test"
    with open(caa_run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r.get("val_dice") for r in rows)


def test_plain_unet_baseline_needs_no_dsdm(shared, tmp_path):
    run = train_seg(shared["data"], tmp_path / "plain", seg_cfg(injection="none", init="scratch"), progress=False)
    assert json.loads((run / "segmenter.json").read_text())["dsdm"] is None
    assert not (run / "init_report.json").exists()
    with pytest.raises(UserInputError, match="needs --dsdm"):
        train_seg(shared["data"], tmp_path / "bad", seg_cfg(injection="caa"), progress=False)


def test_labelled_subset_is_exact_and_reproducible():
    ids = [f"p{i:03d}" for i in range(40)]
    a = choose_labelled(ids, 8, seed=3)
    assert len(a) == 8 and a == choose_labelled(list(ids), 8, seed=3)
    assert a != choose_labelled(ids, 8, seed=4)
    shuffled = ids[::-1]
    assert sorted(shuffled[i] for i in choose_labelled(shuffled, 8, 3)) == sorted(ids[i] for i in a)
    with pytest.raises(UserInputError):
        choose_labelled(ids, 41, 0)


def test_labelled_slides_keep_all_their_patches():
    ids = [f"s{i % 5}_p{i:03d}" for i in range(40)]
    groups = [i.split("_")[0] for i in ids]
    a = choose_labelled(ids, 2, seed=3, groups=groups)
    assert len({groups[i] for i in a}) == 2 and len(a) == 16  # 2 slides x 8 patches each
    assert a == choose_labelled(ids, 2, seed=3, groups=groups)
    assert {groups[i] for i in a} != {groups[i] for i in choose_labelled(ids, 2, seed=5, groups=groups)} or \
        {groups[i] for i in a} != {groups[i] for i in choose_labelled(ids, 2, seed=6, groups=groups)}
    with pytest.raises(UserInputError, match="slides"):
        choose_labelled(ids, 6, 0, groups=groups)


def test_synthetic_ratio_gives_the_stated_counts(shared, tmp_path):
    synth = tmp_path / "synth"
    shutil.copytree(shared["data"], synth)  # any folder in the dataset layout will do
    ds = PatchDataset(synth, splits=None)
    for ratio, n_real in ((0.25, 8), (0.5, 8), (1.0, 8)):
        picked = synthetic_subset(ds, n_real, ratio, seed=0)
        assert len(picked) == round(ratio * n_real) and len(set(picked)) == len(picked)
    with pytest.raises(UserInputError, match="synthetic pairs"):
        synthetic_subset(ds, len(ds), 2.0, seed=0)
    run = train_seg(shared["data"], tmp_path / "mix", seg_cfg(injection="none", init="scratch", synthetic_ratio=0.5),
                    synthetic=synth, progress=False)
    record = json.loads((run / "synthetic.json").read_text())
    n_real = len(PatchDataset(shared["data"]))
    assert record["used"] == round(0.5 * n_real) == len(record["used_ids"]) and record["dropped"] == 0


def test_label_budget_and_poisoned_unlabelled_masks(shared, tmp_path):
    """--labelled N trains on exactly N images; masks of unlabelled rows are never read."""
    data = tmp_path / "data"
    shutil.copytree(shared["data"], data)
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r["split"] == "train"]
    for r in train_rows[:3]:
        r["labelled"] = "0"
        (data / "masks" / f"{r['id']}.png").write_bytes(b"not a png")
    with open(data / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = train_seg(data, tmp_path / "budget", seg_cfg(injection="none", init="scratch", labelled=4, label_seed=1,
                                                                label_unit="patch"),
                    progress=False)
    record = json.loads((run / "segmenter.json").read_text())["training"]
    poisoned = {r["id"] for r in train_rows[:3]}
    assert record["num_labelled"] == 4 and len(record["labelled_ids"]) == 4
    assert not poisoned & set(record["labelled_ids"])


def test_cli_train_seg(shared, tmp_path):
    out = tmp_path / "cli_run"
    result = CliRunner().invoke(app, ["train-seg", str(shared["data"]), "--out", str(out), "--dsdm", str(shared["dsdm"]),
                                      "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--injection", "skip",
                                      "--blocks", "2", "--timesteps", "100"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "segmenter.json").read_text())["injection"] == "skip"
    bad = CliRunner().invoke(app, ["train-seg", str(shared["data"]), "--out", str(tmp_path / "x"), "--preset", "tiny",
                                   "--injection", "caa"])
    assert isinstance(bad.exception, UserInputError) and "needs --dsdm" in str(bad.exception)


def test_quality_filter_reports_kept_and_dropped(shared, caa_run, tmp_path):
    """A real-data segmenter scores every synthetic pair; pairs under the threshold are dropped."""
    synth = tmp_path / "synth"
    shutil.copytree(shared["data"], synth)
    cfg = seg_cfg(injection="none", init="scratch", synthetic_ratio=0.25, filter_threshold=0.0, steps=1)
    rec = json.loads((train_seg(shared["data"], tmp_path / "all", cfg, synthetic=synth, filter_model=caa_run,
                                progress=False) / "synthetic.json").read_text())
    assert rec["kept"] == rec["available"] == len(rec["filter"]) and rec["dropped"] == 0
    dices = [r["mean_dice"] for r in rec["filter"]]
    threshold = float(np.median(dices))
    cfg = seg_cfg(injection="none", init="scratch", synthetic_ratio=0.25, filter_threshold=threshold, steps=1)
    rec2 = json.loads((train_seg(shared["data"], tmp_path / "half", cfg, synthetic=synth, filter_model=caa_run,
                                 progress=False) / "synthetic.json").read_text())
    kept_ids = {r["id"] for r in rec2["filter"] if r["kept"]}
    assert rec2["kept"] == sum(d >= threshold for d in dices) == len(kept_ids)
    assert rec2["kept"] + rec2["dropped"] == rec2["available"] and set(rec2["used_ids"]) <= kept_ids
    with pytest.raises(UserInputError, match="after filtering"):
        train_seg(shared["data"], tmp_path / "none", seg_cfg(injection="none", init="scratch", synthetic_ratio=0.25,
                  filter_threshold=1.01), synthetic=synth, filter_model=caa_run, progress=False)
    with pytest.raises(UserInputError, match="needs --filter-threshold"):
        train_seg(shared["data"], tmp_path / "nothr", seg_cfg(injection="none", init="scratch", synthetic_ratio=0.25),
                  synthetic=synth, filter_model=caa_run, progress=False)
