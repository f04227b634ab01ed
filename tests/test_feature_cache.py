"""The frozen-DSDM feature cache (issue 17): cached = recomputed, keyed by weights and settings,
bounded, never fed the jittered image or the mask, and exact across resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusiondci.train.segmentation as seg_mod
from diffusiondci.data.augment import dihedral
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.models.unet import DSDMUNet
from diffusiondci.segmentation.feature_cache import FeatureCache, image_key, weights_fingerprint
from diffusiondci.segmentation.features import DiffusionFeatureExtractor
from diffusiondci.train.segmentation import train_seg
from tests.test_dsdm import build_inputs, conditional_run
from tests.test_segmentation import seg_cfg


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    inputs = build_inputs(base)
    return {**inputs, "dsdm": conditional_run(base, inputs)}


def extractor(shared, **kw) -> DiffusionFeatureExtractor:
    args = dict(blocks=[1, 2], timesteps=[50, 300], feature_dtype="float16")
    args.update(kw)
    return DiffusionFeatureExtractor.from_run(shared["dsdm"], **args)


def images(shared, n: int = 5) -> torch.Tensor:
    ds = PatchDataset(shared["data"])
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_cached_features_equal_recomputed_ones(shared, tmp_path):
    fx = extractor(shared)
    x = images(shared)
    states = [0, 3, 5, 0, 7]
    views = torch.stack([dihedral(img, k) for img, k in zip(x, states)])
    cache = FeatureCache(fx, tmp_path / "cache", max_bytes=10**9, chunk=3)
    cold = cache.features(views)
    assert cache.stats == {"hits": 0, "misses": 5, "evicted": 0}
    warm_cache = FeatureCache(fx, tmp_path / "cache", max_bytes=10**9, chunk=3)
    warm = warm_cache.features(views)
    assert warm_cache.stats["hits"] == 5
    off = FeatureCache(fx, None, max_bytes=1, chunk=3).features(views)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # a bf16 segmenter's step: still fp32 features
        under_bf16 = FeatureCache(fx, None, max_bytes=1, chunk=3).features(views)
    assert all(torch.equal(cold[b], under_bf16[b]) for b in fx.blocks)
    shuffled = FeatureCache(fx, None, max_bytes=1, chunk=3).features(views.flip(0))
    for b in fx.blocks:
        assert cold[b].dtype == torch.float32 and cold[b].shape[0] == 5
        assert torch.equal(cold[b], warm[b]) and torch.equal(cold[b], off[b])
        assert torch.equal(cold[b], shuffled[b].flip(0))  # an image's features do not depend on its batch
    # a file holds one view in the stored dtype; its numbers are the extractor's, rounded once
    stored = load_file(str(cache.path(image_key(dihedral(x[1], 3)))))
    assert stored["block1"].dtype == torch.float16 and torch.equal(stored["block1"].float(), cold[1][1])
    settings = json.loads((cache.folder / "settings.json").read_text())
    assert settings["extraction"]["blocks"] == [1, 2] and settings["weights_sha256"] == cache.settings["weights_sha256"]
    # inference (features from the image, whatever batch) agrees up to float rounding
    direct = fx(views)
    assert all(torch.allclose(direct[b], cold[b], atol=2e-3, rtol=2e-3) for b in fx.blocks)


def test_new_weights_or_settings_never_read_old_features(shared, tmp_path):
    fx = extractor(shared)
    x = images(shared, 2)
    base = FeatureCache(fx, tmp_path, 10**9)
    first = base.features(x)
    others = {
        "timesteps": extractor(shared, timesteps=[50, 400]),
        "blocks": extractor(shared, blocks=[1, 3]),
        "seed": extractor(shared, seed=1),
        "dtype": extractor(shared, feature_dtype="bfloat16"),
    }
    folders = {base.folder}
    for name, other in others.items():
        cache = FeatureCache(other, tmp_path, 10**9)
        assert cache.folder not in folders, name
        folders.add(cache.folder)
        cache.features(x)
        assert cache.stats["hits"] == 0, name
    assert FeatureCache(fx, tmp_path, 10**9, chunk=2).folder not in folders  # the batch size is a setting too
    # other DSDM weights (one tensor nudged): another folder, other features
    changed = extractor(shared)
    with torch.no_grad():
        changed.dsdm.conv_in.conv.weight.add_(0.05)
    assert weights_fingerprint(changed.dsdm, changed.encoder) != weights_fingerprint(fx.dsdm, fx.encoder)
    cache = FeatureCache(changed, tmp_path, 10**9)
    assert cache.folder not in folders
    again = cache.features(x)
    assert cache.stats["hits"] == 0 and not torch.equal(again[1], first[1])
    # the same extractor finds its own folder again
    same = FeatureCache(extractor(shared), tmp_path, 10**9)
    same.features(x)
    assert same.folder == base.folder and same.stats["hits"] == 2


def test_size_bound_drops_least_recently_used_and_bad_files_are_misses(shared, tmp_path):
    fx = extractor(shared)
    x = images(shared, 4)
    keys = [image_key(img) for img in x]
    probe = FeatureCache(fx, tmp_path / "probe", 10**9)
    probe.features(x[:1])
    one = probe.total_bytes
    cache = FeatureCache(fx, tmp_path / "c", max_bytes=int(3.5 * one))
    cache.features(x[:3])
    cache.features(x[:1])  # image 0 is now the most recently used, image 1 the least
    cache.features(x[3:4])
    assert cache.total_bytes <= 3.5 * one and cache.stats["evicted"] == 1
    assert [cache.path(k).is_file() for k in keys[:4]] == [True, False, True, True]
    # a torn file is recomputed, and gives the same numbers
    reference = FeatureCache(fx, None, 1).features(x[2:3])
    cache.path(keys[2]).write_bytes(b"not safetensors")
    fresh = FeatureCache(fx, tmp_path / "c", max_bytes=int(3.5 * one))
    got = fresh.features(x[2:3])
    assert fresh.stats["misses"] == 1 and all(torch.equal(got[b], reference[b]) for b in got)


def test_dsdm_sees_only_unjittered_views_and_never_a_mask(shared, tmp_path, monkeypatch):
    """Training with strong jitter: every image the frozen DSDM (and its encoder) gets is exactly a
    dihedral view of a dataset image; the mask argument is always the NULL mask."""
    ds = PatchDataset(shared["data"], splits=("train", "val"))
    allowed = {image_key(dihedral(ds[i]["image"], k)) for i in range(len(ds)) for k in range(8)}
    allowed.add(image_key(torch.zeros_like(ds[0]["image"])))  # the padding of the last chunk
    seen_images, seen_masks, x_t = [], [], []
    extract, forward = DiffusionFeatureExtractor.forward, DSDMUNet.forward

    def spy_extract(self, imgs):
        seen_images.extend(image_key(v) for v in imgs.cpu())
        return extract(self, imgs)

    def spy_forward(self, x, t, mask=None, ref=None, **kw):
        seen_masks.append(mask)
        x_t.append(x)
        return forward(self, x, t, mask=mask, ref=ref, **kw)

    monkeypatch.setattr(DiffusionFeatureExtractor, "forward", spy_extract)
    monkeypatch.setattr(DSDMUNet, "forward", spy_forward)
    cfg = seg_cfg(jitter_p=1.0, brightness=0.5, hue=0.2, steps=3, feature_cache=str(tmp_path / "cache"))
    train_seg(shared["data"], tmp_path / "run", cfg, dsdm_run=shared["dsdm"], progress=False, evaluate_test=False)
    assert seen_images and set(seen_images) <= allowed
    assert seen_masks and all(m is None for m in seen_masks)


def test_resume_is_exact_whatever_the_cache_holds(shared, tmp_path, monkeypatch):
    """A run with the cache off; the same run killed after its step-2 checkpoint (cache A) and resumed
    with an empty cache B: bit-identical weights. The cache's place is not part of config.json."""
    kw = dict(steps=4, ckpt_every=2, val_every=2, lr_warmup=1, lr_schedule="poly", jitter_p=1.0)
    full = train_seg(shared["data"], tmp_path / "full", seg_cfg(feature_cache="off", **kw), dsdm_run=shared["dsdm"],
                     progress=False, evaluate_test=False, device="cpu")
    real, calls = seg_mod.make_loss, {"n": 0}

    def killing_loss(name, weight=None):
        loss = real(name, weight)

        def fn(logits, labels):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
            return loss(logits, labels)
        return fn

    monkeypatch.setattr(seg_mod, "make_loss", killing_loss)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_seg(shared["data"], part, seg_cfg(feature_cache=str(tmp_path / "A"), **kw), dsdm_run=shared["dsdm"],
                  progress=False, evaluate_test=False, device="cpu")
    monkeypatch.setattr(seg_mod, "make_loss", real)
    assert any((tmp_path / "A").rglob("*.safetensors"))
    train_seg(shared["data"], part, seg_cfg(feature_cache=str(tmp_path / "B"), **kw), dsdm_run=shared["dsdm"],
              resume=True, progress=False, evaluate_test=False, device="cpu")
    a = load_file(str(full / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
