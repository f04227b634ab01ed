"""The `sample` stage: loading a DSDM run, guidance, seeded sampling, the output folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusiondci.data.imageio import read_mask, read_rgb
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.diffusion.dsdm_run import load_dsdm
from diffusiondci.diffusion.generate import batch_generator, generate, guided_model_fn, in_precision
from diffusiondci.diffusion.pipeline import SampleConfig, sample_to_folder
from diffusiondci.diffusion.samplers import ddim_sample
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.errors import UserInputError
from diffusiondci.models.conditions import mask_one_hot
from diffusiondci.models.unet import DSDMUNet
from diffusiondci.train.dsdm import build_unet_config
from tests.test_dsdm import build_inputs, conditional_run, micro_config, unconditional_run


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    inputs = build_inputs(base)
    return {**inputs, "cond": conditional_run(base, inputs), "uncond": unconditional_run(base, inputs)}


@pytest.fixture(scope="module")
def random_net() -> DSDMUNet:
    """A micro DSDM with all weights perturbed, so that mask, reference and null passes all differ."""
    torch.manual_seed(0)
    net = DSDMUNet(build_unet_config(micro_config(), image_size=64, ref_dim=512)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.fixture(scope="module")
def conditions(shared):
    ds = PatchDataset(shared["data"], splits=None)
    masks = torch.stack([ds[i]["mask"] for i in range(3)])
    return masks, torch.randn(3, 512, generator=torch.Generator().manual_seed(5))


def test_guidance_formula(random_net, conditions):
    """eq. 17 against an independent computation with the network's own NULL conditions."""
    masks, refs = conditions
    x = torch.randn(3, 3, 64, 64)
    t = torch.tensor([10, 400, 900])
    with torch.no_grad():
        out_c = random_net(x, t, mask=mask_one_hot(masks), ref=refs)
        out_u = random_net(x, t, mask=None, ref=None)
        assert (out_c[:, :3] - out_u[:, :3]).abs().max() > 1e-3  # the conditions matter
        for s in (0.0, 3.0):
            got = guided_model_fn(random_net, masks, refs, s)(x, t)
            want_eps = out_c[:, :3] + s * (out_c[:, :3] - out_u[:, :3])
            # batched (cond + null in one forward) vs separate passes: float32 sums differ by ~1e-6 relative,
            # amplified by (1 + s); outputs of this perturbed net reach ~10
            assert torch.allclose(got[:, :3], want_eps, rtol=1e-5, atol=1e-4)
            assert torch.allclose(got[:, 3:], out_c[:, 3:], rtol=1e-5, atol=1e-4)  # variance from the conditional pass


def test_guidance_zero_is_the_conditional_sampler(random_net, conditions):
    masks, refs = conditions
    sched = DiffusionSchedule(1000)
    got = generate(random_net, sched, masks, refs, sampler="ddim", steps=4, guidance=0.0, seed=3, batch_size=8)
    with torch.no_grad():
        want = ddim_sample(lambda x, t: random_net(x, t, mask=mask_one_hot(masks), ref=refs), sched,
                           (3, 3, 64, 64), batch_generator(3, 0), steps=4)
    assert torch.equal(got, want)
    guided = generate(random_net, sched, masks, refs, sampler="ddim", steps=4, guidance=3.0, seed=3)
    assert not torch.equal(got, guided)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp_sde_karras"])
def test_seeded_sampling_is_reproducible(random_net, conditions, sampler):
    masks, refs = conditions
    sched = DiffusionSchedule(1000)
    kw = dict(sampler=sampler, steps=3, guidance=3.0, batch_size=2)
    a = generate(random_net, sched, masks, refs, seed=11, **kw)
    b = generate(random_net, sched, masks, refs, seed=11, **kw)
    c = generate(random_net, sched, masks, refs, seed=12, **kw)
    assert a.shape == (3, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_unconditional_model_ignores_guidance(shared, conditions):
    model, sched, info = load_dsdm(shared["uncond"], device="cpu")
    assert info.encoder is None and not model.config.use_reference
    masks, _ = conditions
    a = generate(model, sched, masks, None, steps=2, guidance=0.0, seed=1)
    b = generate(model, sched, masks, None, steps=2, guidance=3.0, seed=1)
    assert torch.equal(a, b)


def test_sample_to_folder_from_dataset(shared, tmp_path):
    cfg = SampleConfig(sampler="ddim", steps=3, batch_size=4, seed=5)
    out = sample_to_folder(shared["cond"], shared["data"], tmp_path / "gen", cfg, split="test", progress=False,
                           log=lambda m: None)
    src = PatchDataset(shared["data"], splits="test")
    gen = PatchDataset(out, splits=None)  # the output is a dataset PatchDataset can read
    assert len(gen) == len(src) and sorted(gen.ids) == sorted(src.ids)
    for i in range(len(src)):
        pid = src.ids[i]
        assert np.array_equal(read_mask(out / "masks" / f"{pid}.png"), src[i]["mask"].numpy())
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert {r["split"] for r in rows} == {"test"} and all(r["reference"] == r["source_id"] for r in rows)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["parameters"]["generated"] and meta["parameters"]["guidance"] == 3.0
    assert meta["color_norm"] == json.loads((shared["data"] / "dataset.json").read_text())["color_norm"]

    # contact sheet (mask | reference | sample) and progression strip (mask | 6 x_t snapshots)
    n = min(8, len(src))
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (n * 66 + 2, 3 * 66 + 2, 3)
    strip = np.asarray(Image.open(out / "progression.png"))
    assert strip.shape == (4 * 66 + 2, 7 * 66 + 2, 3)

    # same as generate() with the same seed and batch size (references = paired images)
    model, sched, info = load_dsdm(shared["cond"], device="cpu")
    images = torch.stack([src[i]["image"] for i in range(len(src))])
    with torch.no_grad():
        refs = info.encoder(images)
    direct = generate(model, sched, torch.stack([src[i]["mask"] for i in range(len(src))]), refs, steps=3,
                      seed=5, batch_size=4)
    first = read_rgb(out / "images" / f"{src.ids[0]}.png")
    want = ((direct[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(first.astype(int) - want.astype(int)).max() <= 1  # embeddings batched differently

    # interrupted run: a missing image is regenerated bit for bit; other settings are refused
    victim = out / "images" / f"{src.ids[-1]}.png"
    before = victim.read_bytes()
    victim.unlink()
    (out / "dataset.json").unlink()
    sample_to_folder(shared["cond"], shared["data"], out, cfg, split="test", progress=False, log=lambda m: None)
    assert victim.read_bytes() == before
    with pytest.raises(UserInputError, match="other settings"):
        sample_to_folder(shared["cond"], shared["data"], out, SampleConfig(steps=3, seed=6), split="test",
                         progress=False, log=lambda m: None)


def test_sample_from_mask_folder_with_references(shared, tmp_path):
    masks_dir, refs_dir = tmp_path / "masks", tmp_path / "refs"
    masks_dir.mkdir()
    refs_dir.mkdir()
    ds = PatchDataset(shared["data"], splits=None)
    for i, name in enumerate(("a", "b", "c")):
        Image.fromarray(ds[i]["mask"].numpy().astype(np.uint8)).save(masks_dir / f"{name}.png")
    shutil.copy(ds.image_path(5), refs_dir / "b.png")  # matched by id
    Image.open(ds.image_path(6)).resize((96, 96)).save(refs_dir / "z_other.png")  # other size: resized
    cfg = SampleConfig(steps=2, num_samples=2, batch_size=4)
    out = sample_to_folder(shared["cond"], masks_dir, tmp_path / "gen", cfg, references=refs_dir, progress=False,
                           log=lambda m: None)
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["id"] for r in rows] == ["a_s0", "a_s1", "b_s0", "b_s1", "c_s0", "c_s1"]
    # b matched by name; a and c (unmatched) take the folder's images in turn, in name order
    assert [r["reference"] for r in rows[::2]] == ["b.png", "b.png", "z_other.png"]
    assert len(PatchDataset(out, splits="train")) == 6
    a0, a1 = read_rgb(out / "images" / "a_s0.png"), read_rgb(out / "images" / "a_s1.png")
    assert not np.array_equal(a0, a1)  # two samples of one mask differ

    # no references and a plain mask folder: random patches of the model's training split
    out2 = sample_to_folder(shared["cond"], masks_dir, tmp_path / "gen2", SampleConfig(steps=2), progress=False,
                            log=lambda m: None)
    train_ids = set(PatchDataset(shared["data"], splits="train", labelled_only=False).ids)
    assert {r["reference"] for r in csv.DictReader((out2 / "manifest.csv").open())} <= train_ids


def test_bad_masks_rejected(shared, tmp_path):
    bad_labels, bad_size = tmp_path / "labels", tmp_path / "size"
    bad_labels.mkdir()
    bad_size.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 7
    Image.fromarray(mask).save(bad_labels / "m7.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad_size / "small.png")
    with pytest.raises(UserInputError, match="m7.png"):
        sample_to_folder(shared["cond"], bad_labels, tmp_path / "o1", SampleConfig(steps=2), progress=False)
    with pytest.raises(UserInputError, match=r"small.png.*64x64"):
        sample_to_folder(shared["cond"], bad_size, tmp_path / "o2", SampleConfig(steps=2), progress=False)
    with pytest.raises(UserInputError, match="--split"):
        sample_to_folder(shared["cond"], bad_size, tmp_path / "o3", SampleConfig(steps=2), split="test",
                         progress=False)
    with pytest.raises(UserInputError, match="sampler"):
        SampleConfig(sampler="euler")


def test_sampling_precision_bf16_runs_the_network_in_bf16_and_keeps_guidance_in_fp32(random_net, conditions,
                                                                                       monkeypatch):
    """generate(autocast=): bf16 where the CPU has it natively (the network's output cast back to fp32,
    close to the fp32 images); without native bf16, ``auto`` is exactly the fp32 sampler."""
    from diffusiondci import device as device_mod

    masks, refs = conditions
    sched = DiffusionSchedule(1000)
    kw = dict(sampler="ddim", steps=3, guidance=3.0, seed=4, batch_size=8)
    fp32 = generate(random_net, sched, masks, refs, **kw)
    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: False)
    assert torch.equal(generate(random_net, sched, masks, refs, autocast="auto", **kw), fp32)
    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: True)
    x, t = torch.randn(3, 3, 64, 64), torch.tensor([10, 400, 900])
    with torch.no_grad():
        out = in_precision(random_net, "bf16")(x, t, mask=mask_one_hot(masks), ref=refs)
        ref_out = random_net(x, t, mask=mask_one_hot(masks), ref=refs)
    assert out.dtype == torch.float32 and not torch.equal(out, ref_out)  # computed in bf16 ...
    assert (out - ref_out).abs().max() < 0.1 * ref_out.abs().max()  # ... and close to fp32
    bf16 = generate(random_net, sched, masks, refs, autocast="auto", **kw)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().mean() < 0.05


def test_sample_config_checks_the_precision():
    from diffusiondci.config import load_section

    assert load_section("tiny", "sample")["autocast"] == "auto"
    SampleConfig(autocast="fp32")
    with pytest.raises(UserInputError, match="autocast"):
        SampleConfig(autocast="fp16")
