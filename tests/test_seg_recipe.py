"""The segmentation recipe shared by every segmenter (issue 17): Dice + CE loss, warm-up + decay of
the LR, dihedral / zoom / colour augmentation that keeps image, mask and DSDM features aligned,
local CAA, and training without a validation split (``prepare --val-fraction 0``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusiondci.cli import app
from diffusiondci.data.augment import dihedral
from diffusiondci.errors import UserInputError
from diffusiondci.models.segmenter import LocalCAAInjection, Segmenter, sincos_2d
from diffusiondci.models.unet import tiny_config
from diffusiondci.models.segmenter import segmenter_unet_config
from diffusiondci.train.lr_schedule import LRFactor
from diffusiondci.train.seg_augment import apply_dihedral, augment_views, class_weights, draw_dihedral, make_loss
from diffusiondci.train.segmentation import train_seg
from tests.test_dsdm import build_inputs
from tests.test_segmentation import seg_cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.getbasetemp() / "dsdm_shared")


def test_dice_ce_on_a_closed_form_case():
    """Uniform logits over 3 classes, labels [0, 0, 1, 1] (class 2 absent): CE = ln 3; batch Dice of
    classes 0 and 1 = 2 (2/3) / (4/3 + 2) = 0.4, of class 2 = 0 (predicted 4/3, absent); loss =
    1 - 0.8 / 3 + ln 3."""
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 0], [1, 1]]])
    expected = 1 - 0.8 / 3 + math.log(3)
    loss = make_loss("dice_ce")(logits, labels)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert make_loss("ce")(logits, labels).item() == pytest.approx(math.log(3), abs=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    confident = torch.nn.functional.one_hot(torch.tensor([[[0, 0], [1, 2]]]), 3).permute(0, 3, 1, 2).float() * 30
    assert make_loss("dice_ce")(confident, torch.tensor([[[0, 0], [1, 2]]])).item() < 1e-4
    with pytest.raises(UserInputError):
        make_loss("focal")


def test_balanced_class_weights_and_weighted_losses_closed_form():
    """Median-frequency weights: pixel counts 5 / 1 / 2 -> shares 5/8, 1/8, 2/8, median 2/8 ->
    weights 0.4, 2, 1; an absent class weighs 1. Weighted CE of two pixels, (label 0, p = 1/2) and
    (label 1, p = 1/3), with weights (1, 3, 1) = (ln 2 + 3 ln 3) / 4."""
    masks = [torch.tensor([[0, 0, 0], [1, 2, 2]]), torch.tensor([[0, 0]])]
    assert class_weights("balanced", masks, 3).tolist() == pytest.approx([0.4, 2.0, 1.0])
    assert class_weights("balanced", [torch.tensor([0, 0, 0, 1])], 3).tolist() == pytest.approx([2 / 3, 2.0, 1.0])
    assert class_weights("none", masks, 3) is None
    with pytest.raises(UserInputError, match="class_weights"):
        class_weights("inverse", masks, 3)
    logits = torch.tensor([[[[math.log(2), 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    w = torch.tensor([1.0, 3.0, 1.0])
    expected = (math.log(2) + 3 * math.log(3)) / 4
    assert make_loss("ce", w)(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert make_loss("ce")(logits, labels).item() == pytest.approx((math.log(2) + math.log(3)) / 2, abs=1e-6)
    plain = make_loss("dice_ce")(logits, labels).item()
    assert make_loss("dice_ce", torch.ones(3))(logits, labels).item() == pytest.approx(plain, abs=1e-6)
    assert make_loss("dice_ce", w)(logits, labels).item() != pytest.approx(plain, abs=1e-3)


def test_augmentation_keeps_image_mask_and_features_aligned():
    gen = torch.Generator().manual_seed(0)
    # blocks of 8 px whose label is a function of the colour: the mask can be read back from the image
    labels = torch.randint(0, 3, (6, 8, 8), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
    palette = torch.tensor([[-0.8, 0.2, 0.9], [0.5, -0.6, -0.1], [0.9, 0.8, -0.9]])
    images = palette[labels].permute(0, 3, 1, 2).contiguous()
    seen = {}

    def view_features(views, states):
        seen["views"], seen["states"] = views.clone(), list(states)
        return {0: views.clone(), 1: torch.nn.functional.avg_pool2d(views, 2)}  # two resolutions

    cfg = seg_cfg(augment="dihedral", scale_range=[0.8, 1.25], jitter_p=0.0)
    x, y, feats = augment_views(images, labels, cfg, gen, view_features)
    states = torch.tensor(seen["states"])
    assert len(set(seen["states"])) > 1
    assert torch.equal(seen["views"], torch.stack([dihedral(im, int(k)) for im, k in zip(images, states)]))
    assert torch.equal(x, feats[0])  # no jitter: the segmenter's input is the zoomed DSDM view itself
    # the mask moved with the image: colour -> label agrees except on block borders blurred by the zoom
    nearest = torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, 3), palette).argmin(1).reshape(y.shape)
    assert (nearest == y).float().mean() > 0.9
    # the coarse features were zoomed with the same grid (compare with pooling the zoomed full-size map)
    assert (feats[1] - torch.nn.functional.avg_pool2d(feats[0], 2)).abs().mean() < 0.1

    # dihedral alone is exact for images and masks; jitter changes the segmenter's input only
    cfg = seg_cfg(augment="dihedral", scale_range=[1.0, 1.0], jitter_p=1.0, brightness=0.5)
    x, y, feats = augment_views(images, labels, cfg, torch.Generator().manual_seed(1), view_features)
    states = torch.tensor(seen["states"])
    assert torch.equal(y, apply_dihedral(labels, states)) and torch.equal(feats[0], apply_dihedral(images, states))
    assert not torch.allclose(x, feats[0])
    for mode, allowed in (("none", {0}), ("hflip", {0, 4}), ("dihedral", set(range(8)))):
        assert set(draw_dihedral(200, mode, torch.Generator().manual_seed(0)).tolist()) == allowed


def test_local_caa_is_pixel_aligned_and_starts_as_identity():
    torch.manual_seed(0)
    layer = LocalCAAInjection(32, 16, 16, 8, window=3)
    h, f = torch.randn(2, 32, 8, 8), torch.randn(2, 16, 16, 16)
    assert torch.equal(layer(h, f), h)  # zero-initialised output
    torch.nn.init.normal_(layer.out.weight)
    # a change of the DSDM features far from a pixel does not reach it (window 3 on the query grid)
    f2 = f.clone()
    f2[..., 12:, 12:] += 5
    diff = (layer(h, f2) - layer(h, f)).abs().sum(1)
    assert diff[:, :4, :4].max() == 0 and diff[:, 6:, 6:].min() > 0
    seg = Segmenter(segmenter_unet_config(tiny_config()), "caa", {1: 16, 3: 16}, caa_window=3)
    out = seg(torch.randn(1, 3, 64, 64), {1: torch.randn(1, 16, 32, 32), 3: torch.randn(1, 16, 64, 64)})
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(UserInputError):
        LocalCAAInjection(32, 16, 16, 8, window=2)


def test_position_codes_stay_below_the_grid_nyquist_limit():
    for n in (8, 16, 32):
        codes = sincos_2d(n, n, 64, grid=n)
        assert (codes.std(0) > 0.1).all()  # every channel varies over the grid
        # neighbouring pixels are closer than far ones in every y channel (no aliasing)
        rows = codes.reshape(n, n, 64)[:, 0, :32]
        assert ((rows[1:] - rows[:-1]).abs().max(0).values < 1.6).all()
    old = sincos_2d(16, 16, 64, mode="octave")
    assert (old.std(0) < 1e-3).sum() > 20  # the first version: many channels constant on 16 x 16


def test_lr_warms_up_then_decays_in_train_seg(inputs, tmp_path):
    cfg = seg_cfg(injection="none", init="scratch", steps=10, lr=1e-3, lr_schedule="poly", lr_warmup=2,
                  log_every=1, val_every=5, ckpt_every=10)
    run = train_seg(inputs["data"], tmp_path / "run", cfg, progress=False, evaluate_test=False)
    with open(run / "log.csv") as fh:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(fh) if r.get("lr")}
    factor = LRFactor("poly", 10, 2, 0.0)  # (the warm-up is capped at a fifth of the steps: 2 here)
    for step in range(1, 10):  # logged after `step` optimizer steps: the LR of the next one
        assert lrs[step] == pytest.approx(1e-3 * factor(step), rel=1e-6), step
    assert lrs[1] == pytest.approx(1e-3) == lrs[2] and lrs[9] < lrs[5] < lrs[3] < lrs[2]
    training = json.loads((run / "segmenter.json").read_text())["training"]
    assert training["lr_schedule"] == "poly" and training["loss"] == "dice_ce"
    assert training["checkpoint_policy"] == "best_val_dice_dataset" and (run / "checkpoints" / "best").is_dir()


def test_no_validation_split_trains_keeps_the_last_checkpoint_and_segments(inputs, tmp_path):
    """prepare --val-fraction 0 -> train-seg -> segment -> evaluate-seg, end to end."""
    slides = inputs["data"].parent / "sample" / "slides"
    truth = inputs["data"].parent / "sample" / "truth"
    data, run, pred = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", str(slides), "--out", str(data), "--preset", "tiny", "--tile-size", "128",
                              "--groups", str(slides / "groups.csv"), "--val-fraction", "0", "--test-fraction", "0.3"])
    assert res.exit_code == 0, res.output
    with open(data / "manifest.csv") as fh:
        splits = {r["split"] for r in csv.DictReader(fh)}
    assert "val" not in splits and "train" in splits
    res = runner.invoke(app, ["train-seg", str(data), "--out", str(run), "--preset", "tiny", "--injection", "none",
                              "--init", "scratch", "--steps", "3", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    record = json.loads((run / "segmenter.json").read_text())
    assert record["training"]["checkpoint_policy"] == "last"
    assert not (run / "checkpoints" / "best").exists() and (run / "checkpoints" / "latest").is_dir()
    assert json.loads((run / "test_metrics.json").read_text())["checkpoint"].endswith("latest")
    slide = slides / "phantom_001.png"
    res = runner.invoke(app, ["segment", str(slide), "--model", str(run), "--out", str(pred)])
    assert res.exit_code == 0, res.output
    labels = np.asarray(Image.open(pred / "phantom_001_labels.png"))
    assert labels.shape[:2] == np.asarray(Image.open(slide)).shape[:2]
    only = tmp_path / "truth"
    only.mkdir()
    (only / "phantom_001_mask.png").write_bytes((truth / "phantom_001_mask.png").read_bytes())
    res = runner.invoke(app, ["evaluate-seg", "--pred", str(pred), "--truth", str(only), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 1


def test_autocast_bf16_where_native_else_fp32(inputs, tmp_path, monkeypatch):
    """``seg.autocast: auto`` trains in bf16 autocast where the hardware has native bf16 and falls back
    to fp32 where it does not; ``fp32`` always trains in fp32. The run records what it used (and the
    class weights of ``class_weights: balanced``)."""
    import diffusiondci.device as device_mod
    from diffusiondci.train.seg_config import SegConfig

    def precision(run: Path) -> str:
        return json.loads((run / "segmenter.json").read_text())["training"]["precision"]

    def train(name: str, **kw) -> Path:
        cfg = seg_cfg(injection="none", init="scratch", steps=2, val_every=2, ckpt_every=2, **kw)
        return train_seg(inputs["data"], tmp_path / name, cfg, progress=False, evaluate_test=False)

    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: True)
    bf16 = train("bf16", autocast="auto", class_weights="balanced")
    assert precision(bf16) == "bf16"
    weights = json.loads((bf16 / "segmenter.json").read_text())["training"]["class_weights"]
    assert len(weights) == 3 and all(w > 0 for w in weights) and weights != [1.0, 1.0, 1.0]
    assert precision(train("fp32", autocast="fp32")) == "fp32"
    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: False)
    assert precision(train("fallback", autocast="auto")) == "fp32"
    with open(bf16 / "log.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    with pytest.raises(UserInputError, match="seg.autocast"):
        SegConfig(autocast="fp16")
    res = CliRunner().invoke(app, ["train-seg", "--help"])
    assert "--autocast" in res.output
