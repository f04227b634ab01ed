"""Tests for the DSDM U-Net (models/unet.py) and MCAA (models/attention.py)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusiondci.errors import UserInputError
from diffusiondci.models.attention import CrossAttentionAlignment, EmbeddingTransform
from diffusiondci.models.unet import DSDMUNet, UNetConfig, paper_config, tiny_config, tiny_v1_config

N, S = 2, 64
COMBOS = [("spade", True), ("spade", False), ("group", True), ("group", False)]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers (output conv, ResBlock conv2, MCAA out_proj, null_ref) random values.

    At initialisation those layers make the U-Net output 0 and MCAA the identity, which would hide
    whether a condition reaches the output.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _model(decoder_norm: str = "spade", use_reference: bool = True, **kw) -> DSDMUNet:
    torch.manual_seed(0)
    return _randomise(DSDMUNet(tiny_config(decoder_norm=decoder_norm, use_reference=use_reference, **kw)))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, S, S, generator=g)
    t = torch.tensor([3, 700])
    labels = torch.randint(0, 3, (N, S, S), generator=g)
    mask = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    ref = torch.randn(N, 512, generator=g)
    return x, t, labels, mask, ref


@pytest.mark.parametrize(("norm", "use_ref"), COMBOS)
def test_output_shape_every_ablation(norm, use_ref):
    model = _model(norm, use_ref)
    x, t, _, mask, ref = _inputs()
    with torch.no_grad():
        out = model(x, t, mask, ref)
    assert out.shape == (N, 6, S, S)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("norm", "use_ref"), COMBOS)
def test_mask_matters_iff_spade(norm, use_ref):
    model = _model(norm, use_ref)
    x, t, labels, mask, ref = _inputs()
    other = torch.roll(mask, shifts=1, dims=1)  # relabel every pixel
    with torch.no_grad():
        a, b = model(x, t, mask, ref), model(x, t, other, ref)
    if norm == "spade":
        assert (a - b).abs().max() > 1e-4
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize(("norm", "use_ref"), COMBOS)
def test_reference_matters_iff_use_reference(norm, use_ref):
    model = _model(norm, use_ref)
    assert (model.ref_transforms is not None) == use_ref
    assert any(b.mcaa is not None for b in model.decoder_blocks) == use_ref
    x, t, _, mask, ref = _inputs()
    with torch.no_grad():
        a, b = model(x, t, mask, ref), model(x, t, mask, -ref)
    if use_ref:
        assert (a - b).abs().max() > 1e-4
    else:
        assert torch.equal(a, b)


def test_label_mask_equals_one_hot_mask():
    model = _model()
    x, t, labels, mask, ref = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, labels, ref), model(x, t, mask, ref), atol=1e-6)


@pytest.mark.parametrize(("norm", "use_ref"), COMBOS)
def test_null_conditions(norm, use_ref):
    model = _model(norm, use_ref)
    null = model.null_conditions(N)
    assert set(null) == {"mask", "ref"}
    if norm == "spade":
        assert null["mask"].shape == (N, 3, S, S) and not null["mask"].any()
    else:
        assert null["mask"] is None
    if use_ref:
        assert null["ref"].shape == (N, 512)
        assert torch.equal(null["ref"][0], model.null_ref) and torch.equal(null["ref"][1], model.null_ref)
    else:
        assert null["ref"] is None
    x, t, _, _, _ = _inputs()
    with torch.no_grad():  # None means NULL
        assert torch.equal(model(x, t, **null), model(x, t))


def test_null_ref_is_learned():
    model = DSDMUNet(tiny_config())
    assert not model.null_ref.abs().any()  # starts as a zero embedding
    _randomise(model).train()
    x, t, _, mask, _ = _inputs()
    model(x, t, mask, None).square().mean().backward()
    assert model.null_ref.grad is not None and model.null_ref.grad.abs().sum() > 0


def test_number_of_decoder_blocks():
    # levels * (num_res_blocks + 1), as guided-diffusion's output_blocks
    assert DSDMUNet(tiny_config()).num_decoder_blocks == 3 * 2
    assert DSDMUNet(tiny_config(num_res_blocks=2, use_reference=False)).num_decoder_blocks == 3 * 3
    model = DSDMUNet(tiny_config())
    assert model.decoder_block_names == [f"decoder_blocks.{i}" for i in range(6)]
    for name in model.decoder_block_names:
        model.get_submodule(name)


def test_taps_shapes_and_match_hooks():
    model = _model()
    x, t, _, mask, ref = _inputs()
    # tiny: levels at 64/32/16 px with (32, 64, 64) channels; decoder runs 16 -> 64 px, the last
    # block of each level includes the x2 upsampler.
    expected = {0: (64, 16, 16), 1: (64, 32, 32), 2: (64, 32, 32), 3: (64, 64, 64), 4: (32, 64, 64), 5: (32, 64, 64)}
    assert dict(enumerate(model.decoder_feature_shapes)) == expected
    hooked: dict[int, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, i=i: hooked.__setitem__(i, o))
        for i, name in enumerate(model.decoder_block_names)
    ]
    with torch.no_grad():
        out, feats = model(x, t, mask, ref, return_features=[1, 3, 5])
        plain = model(x, t, mask, ref)
    for h in handles:
        h.remove()
    assert sorted(feats) == [1, 3, 5]
    for i, f in feats.items():
        assert f.shape == (N, *expected[i])
        assert torch.equal(f, hooked[i])
    assert torch.equal(out, plain)
    with pytest.raises(ValueError, match="out of range"):
        model(x, t, mask, ref, return_features=[6])


def test_taps_scale_with_input_size():
    model = _model(use_reference=False)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out, feats = model(x, torch.tensor([5]), torch.zeros(1, 3, 32, 48), return_features=[0, 5])
    assert out.shape == (1, 6, 32, 48)
    assert feats[0].shape == (1, 64, 8, 12) and feats[5].shape == (1, 32, 32, 48)


def test_mcaa_rejects_single_token():
    with pytest.raises(ValueError, match="ref_tokens"):
        EmbeddingTransform(512, 32, 1)
    with pytest.raises(UserInputError, match="ref_tokens"):
        tiny_config(ref_tokens=1)
    tiny_config(ref_tokens=1, use_reference=False)  # irrelevant without MCAA


def test_caa_matches_hand_computed_attention():
    torch.manual_seed(0)
    c, d, k, heads = 32, 24, 5, 2
    caa = CrossAttentionAlignment(c, d, num_head_channels=c // heads, norm_num_groups=8, use_flash_attention=False)
    x, ctx = torch.randn(2, c, 3, 4), torch.randn(2, k, d)
    assert torch.equal(caa(x, ctx), x)  # zero-initialised output projection: identity at start
    with torch.no_grad():
        caa.attn.out_proj.weight.normal_()
        caa.attn.out_proj.bias.normal_()
    a = caa.attn
    q = torch.nn.functional.group_norm(x, 8, caa.norm.weight, caa.norm.bias, caa.norm.eps).flatten(2).transpose(1, 2)
    q, kk, v = q @ a.to_q.weight.T, ctx @ a.to_k.weight.T, ctx @ a.to_v.weight.T
    hd = c // heads
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., sl] @ kk[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)  # eq. 11
        outs.append(w @ v[..., sl])
    ref = torch.cat(outs, -1) @ a.out_proj.weight.T + a.out_proj.bias
    expected = x + ref.transpose(1, 2).reshape(x.shape)
    assert torch.allclose(caa(x, ctx), expected, atol=1e-5)
    caa_sdpa = CrossAttentionAlignment(c, d, c // heads, norm_num_groups=8, use_flash_attention=True)
    caa_sdpa.load_state_dict(caa.state_dict())
    assert torch.allclose(caa_sdpa(x, ctx), expected, atol=1e-5)


def test_flash_and_plain_attention_agree():
    fast = _model(use_flash_attention=True)
    slow = DSDMUNet(tiny_config(use_flash_attention=False)).eval()
    slow.load_state_dict(fast.state_dict())
    x, t, _, mask, ref = _inputs()
    with torch.no_grad():
        assert torch.allclose(fast(x, t, mask, ref), slow(x, t, mask, ref), atol=1e-4)


def test_state_dict_and_config_round_trip(tmp_path):
    model = _model()
    cfg_path = tmp_path / "unet.json"
    cfg_path.write_text(json.dumps(model.config.to_dict()))
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"))
    cfg = UNetConfig.from_dict(json.loads(cfg_path.read_text()), path=cfg_path)
    assert cfg == model.config
    clone = DSDMUNet(cfg).eval()
    clone.load_state_dict(load_file(str(tmp_path / "unet.safetensors")))
    x, t, _, mask, ref = _inputs()
    with torch.no_grad():
        assert torch.equal(clone(x, t, mask, ref), model(x, t, mask, ref))


def test_spade_modulation_is_plain_convolutions_as_in_sdm():
    """SDM's gamma / beta are plain convolutions: a constant mask gives a constant, non-zero shift.
    MONAI's SPADE instance-normalises them (zero spatial mean): kept only for older records."""
    torch.manual_seed(0)
    mask = torch.zeros(1, 3, 16, 16)
    mask[:, 1] = 1.0  # one class everywhere
    betas = {}
    for legacy in (False, True):
        model = DSDMUNet(tiny_v1_config(spade_modulation_norm=legacy))
        spade = model.decoder_blocks[0].resnet.norm1
        with torch.no_grad():
            betas[legacy] = spade.mlp_beta(spade.mlp_shared(mask))
    inner = betas[False][..., 2:-2, 2:-2]  # away from the zero padding of the two 3x3 convolutions
    assert inner.abs().mean() > 1e-3 and inner.std(dim=(2, 3)).max() < 1e-5
    assert betas[True].mean(dim=(2, 3)).abs().max() < 1e-4  # zero spatial mean: no class-wide shift
    old_record = tiny_config().to_dict()
    del old_record["spade_modulation_norm"]
    assert UNetConfig.from_dict(old_record).spade_modulation_norm is True
    assert UNetConfig.from_dict(tiny_config().to_dict()).spade_modulation_norm is False
    # same parameters either way: a checkpoint loads into both
    DSDMUNet(tiny_v1_config(spade_modulation_norm=True)).load_state_dict(DSDMUNet(tiny_v1_config()).state_dict())


def test_spade_weights_initialise_group_backbone():
    """The segmentation backbone (GroupNorm decoder) loads the DSDM weights except the decoder norms."""
    spade = DSDMUNet(tiny_config())
    group = DSDMUNet(tiny_config(decoder_norm="group"))
    result = group.load_state_dict(spade.state_dict(), strict=False)
    assert result.missing_keys and result.unexpected_keys
    assert all(k.startswith("decoder_blocks.") and ".resnet.norm" in k for k in result.missing_keys)
    assert all(
        (k.startswith("decoder_blocks.") and ".resnet.norm" in k) or k.startswith("mask_encoders.")
        for k in result.unexpected_keys
    )


def test_config_validation():
    with pytest.raises(UserInputError, match="decoder_norm"):
        tiny_config(decoder_norm="batch")
    with pytest.raises(UserInputError, match="attention_levels"):
        tiny_config(attention_levels=(True,))
    with pytest.raises(UserInputError, match="image_size"):
        tiny_config(image_size=62)  # not a multiple of 2**(3-1)
    with pytest.raises(UserInputError, match="unknown keys") as info:
        UNetConfig.from_dict({"chanels": [32, 64]}, path="cfg.yaml")
    assert "cfg.yaml" in str(info.value)


def test_bad_condition_shapes():
    model = _model()
    x, t, _, mask, ref = _inputs()
    with pytest.raises(ValueError, match="mask"):
        model(x, t, mask[:, :2], ref)
    with pytest.raises(ValueError, match="ref"):
        model(x, t, mask, ref[:, :100])


def test_tiny_preset_size_and_speed():
    torch.manual_seed(0)
    model = DSDMUNet(tiny_config()).train()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 4_000_000
    x, t, _, mask, ref = _inputs()
    x, mask, ref, t = x.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1), ref.repeat(2, 1), t.repeat(2)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(x, t, mask, ref).square().mean().backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad()
    print(f"\ntiny DSDM U-Net: {n_params / 1e6:.2f} M params; forward+backward batch 4 at 64 px: {min(times):.3f} s")
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_config_builds():
    torch.manual_seed(0)
    model = DSDMUNet(paper_config()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\npaper DSDM U-Net: {n_params / 1e6:.1f} M params, {model.num_decoder_blocks} decoder blocks")
    assert 30_000_000 <= n_params <= 100_000_000
    assert model.num_decoder_blocks == 6 * 3
    # paper's taps {6..10}: 32 px (128 ch) blocks 6-7, block 8 upsampled to 64 px, 9-10 at 64 px
    taps = ((128, 32, 32), (128, 32, 32), (128, 64, 64), (128, 64, 64), (128, 64, 64))
    assert model.decoder_feature_shapes[6:11] == taps
    x = torch.randn(1, 3, 256, 256)
    t0 = time.perf_counter()
    with torch.no_grad():
        mask, ref = torch.zeros(1, 3, 256, 256), torch.randn(1, 512)
        out, feats = model(x, torch.tensor([500]), mask, ref, return_features=[6, 10])
    print(f"paper forward batch 1 at 256 px: {time.perf_counter() - t0:.2f} s")
    assert out.shape == (1, 6, 256, 256)
    assert feats[10].shape == (1, 128, 64, 64)


def test_shared_spade_reads_the_mask_once_per_level_and_modulates_per_norm():
    """Shared mode: one mask encoder per decoder level, a 2C-channel gamma/beta conv per norm; a class
    painted everywhere shifts the features uniformly (plain convolutions, away from the border)."""
    torch.manual_seed(0)
    model = DSDMUNet(tiny_config(spade_mode="shared", spade_kernel_size=1))
    assert model.mask_encoders is not None and len(model.mask_encoders) == len(model.config.channels)
    norm = model.decoder_blocks[0].resnet.norm1
    assert norm.modulation.out_channels == 2 * norm.norm.num_channels and norm.modulation.kernel_size == (1, 1)
    mask = torch.zeros(1, 3, 16, 16)
    mask[:, 2] = 1.0
    hidden = model.mask_encoders[2](mask, (16, 16))
    x = torch.randn(1, norm.norm.num_channels, 16, 16)
    out = norm(x, hidden)
    gamma, beta = norm.modulation(hidden).chunk(2, dim=1)
    expected = torch.nn.functional.group_norm(x, norm.norm.num_groups, eps=norm.norm.eps) * (1 + gamma) + beta
    torch.testing.assert_close(out, expected)
    inner = beta[..., 1:-1, 1:-1]
    assert inner.abs().mean() > 1e-3 and inner.std(dim=(2, 3)).max() < 1e-5
    # the mask matters: another class gives another output
    other = torch.zeros_like(mask)
    other[:, 1] = 1.0
    assert not torch.allclose(norm(x, model.mask_encoders[2](other, (16, 16))), out)


def test_mcaa_levels_choose_where_the_reference_enters():
    model = DSDMUNet(tiny_config(mcaa_levels=(False, True, True)))
    levels = {b.level for b in model.decoder_blocks if b.mcaa is not None}
    assert levels == {1, 2} and sorted(model.ref_transforms) == ["1", "2"]
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        for block in model.decoder_blocks:  # make MCAA non-trivial (its output starts at zero)
            if block.mcaa is not None:
                torch.nn.init.normal_(block.mcaa.attn.out_proj.weight, std=0.1)
        a = model(x, t, mask=torch.randint(0, 3, (2, 64, 64)), ref=torch.randn(2, 512))
        b = model(x, t, mask=torch.randint(0, 3, (2, 64, 64)) * 0, ref=torch.randn(2, 512))
    assert a.shape == b.shape == (2, 6, 64, 64)
    with pytest.raises(UserInputError, match="mcaa_levels"):
        tiny_config(mcaa_levels=(True,))
    with pytest.raises(UserInputError, match="spade_mode"):
        tiny_config(spade_mode="fancy")
    # records round-trip, and a record without the new fields is the per-block, every-level network
    assert UNetConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    old = tiny_v1_config().to_dict()
    for key in ("spade_mode", "spade_kernel_size", "mcaa_levels"):
        del old[key]
    assert UNetConfig.from_dict(old).spade_mode == "per_block" and UNetConfig.from_dict(old).mcaa_levels is None


def test_tiny_narrow_preset_halves_the_finer_levels():
    from diffusiondci.models.unet import UNET_PRESETS, tiny_narrow_config

    narrow, tiny = tiny_narrow_config(), tiny_config()
    assert UNET_PRESETS["tiny_narrow"] is tiny_narrow_config
    assert narrow.channels == (16, 32, 64) and tiny.channels == (32, 64, 64)
    # the same structure otherwise: only the widths (and the groups / heads they need) differ
    same = ("spade_mode", "spade_kernel_size", "mcaa_levels", "attention_levels", "num_res_blocks", "ref_tokens")
    assert all(getattr(narrow, f) == getattr(tiny, f) for f in same)
    small, big = DSDMUNet(narrow), DSDMUNet(tiny)
    assert sum(p.numel() for p in small.parameters()) < 0.75 * sum(p.numel() for p in big.parameters())
    x, t, _, mask, ref = _inputs()
    assert small(x, t, mask, ref).shape == big(x, t, mask, ref).shape
