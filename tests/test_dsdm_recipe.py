"""The DSDM training recipe: joint dihedral augmentation, LR warm-up + decay, min-SNR weights,
bf16 autocast detection with its fp32 fallback."""

from __future__ import annotations

import math

import pytest
import torch

from diffusiondci import device as device_mod
from diffusiondci.data.augment import dihedral, random_dihedral
from diffusiondci.diffusion.losses import hybrid_loss, min_snr_weights
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.errors import UserInputError
from diffusiondci.train.dsdm import DSDMConfig
from diffusiondci.train.lr_schedule import LRFactor, make_lr_scheduler


def test_dihedral_group_has_eight_distinct_label_preserving_transforms():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(outs[0], x)
    assert torch.equal(outs[4], x.flip(-1)) and torch.equal(outs[1], torch.rot90(x, 1, (-2, -1)))
    for o in outs:  # same multiset of values: a permutation of the pixels
        assert sorted(o.flatten().tolist()) == sorted(x.flatten().tolist())
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_random_dihedral_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (32, 8, 8))
    image = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 2 - 1  # image encodes its mask
    img_aug, mask_aug = random_dihedral([image, mask], "dihedral", generator=g)
    assert torch.equal(img_aug.argmax(1), mask_aug)  # still aligned, pixel for pixel
    assert not torch.equal(mask_aug, mask)  # something moved
    kinds = {next(k for k in range(8) if torch.equal(dihedral(mask[i], k), mask_aug[i])) for i in range(32)}
    assert len(kinds) >= 5  # draws spread over the group
    flipped, _ = random_dihedral([image, mask], "hflip", generator=g)
    assert all(torch.equal(flipped[i], image[i]) or torch.equal(flipped[i], image[i].flip(-1)) for i in range(32))
    same = random_dihedral([image, mask], "none", generator=g)
    assert same[0] is image and same[1] is mask


def test_lr_warmup_then_cosine_and_poly_reach_the_floor():
    f = LRFactor("cosine", total=110, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    p = LRFactor("poly", total=100, warmup=0, min_ratio=0.0)
    assert p(50) == pytest.approx(0.5**0.9)
    assert LRFactor("constant", total=100, warmup=4)(50) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_lr_scheduler(opt, "cosine", total=20, warmup=0, min_ratio=0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0) and lrs[10] == pytest.approx(1.0) and lrs == sorted(lrs, reverse=True)
    assert make_lr_scheduler(opt, "constant", total=20) is None
    assert make_lr_scheduler(opt, "constant", total=4, warmup=100) is None  # warm-up capped at total // 5
    short = make_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", 100, 100)
    assert short.lr_lambdas[0](19) == pytest.approx(1.0)  # warm-up over 20 of the 100 steps
    # the factor is rebuilt from the config, not restored from a checkpoint
    assert sched.state_dict()["lr_lambdas"] == [None]


def test_min_snr_weights_closed_form():
    schedule = DiffusionSchedule(1000)
    t = torch.tensor([0, 100, 500, 999])
    w = min_snr_weights(schedule, t, gamma=5.0)
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr)).float()
    torch.testing.assert_close(w, expected)
    assert w[0] < 0.01 and w[-1] == 1.0  # nearly clean steps down-weighted, noisy ones kept


def test_mse_weights_change_only_the_simple_term():
    torch.manual_seed(0)
    schedule = DiffusionSchedule(100)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 50, 99])
    x_t = schedule.q_sample(x0, t, noise)
    out = torch.randn(4, 6, 8, 8)
    plain = hybrid_loss(schedule, out, x0, x_t, t, noise)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    weighted = hybrid_loss(schedule, out, x0, x_t, t, noise, mse_weights=w)
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["vlb"], plain["vlb"])
    torch.testing.assert_close(weighted["loss"] - plain["loss"], (w - 1) * plain["mse"])


def test_autocast_auto_uses_native_bf16_and_falls_back_to_fp32(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: True)
    assert device_mod.resolve_autocast("auto", cpu) == "bf16"
    assert device_mod.resolve_autocast("fp32", cpu) is None and device_mod.resolve_autocast(None, cpu) is None
    monkeypatch.setattr(device_mod, "native_bf16", lambda dev: False)
    assert device_mod.resolve_autocast("auto", cpu) is None
    with pytest.warns(UserWarning, match="no native bf16"):
        assert device_mod.resolve_autocast("bf16", cpu) is None
    with pytest.raises(UserInputError, match="autocast"):
        device_mod.resolve_autocast("fp16", cpu)


def test_recipe_fields_are_validated():
    with pytest.raises(UserInputError, match="augment"):
        DSDMConfig(augment="mixup")
    with pytest.raises(UserInputError, match="lr_schedule"):
        DSDMConfig(lr_schedule="step")
    with pytest.raises(UserInputError, match="loss_weighting"):
        DSDMConfig(loss_weighting="p2")
    assert DSDMConfig(sample_guidance=[0, 1, 3]).sample_guidance == [0.0, 1.0, 3.0]
    assert not math.isnan(LRFactor("cosine", total=0)(0))


def test_ema_initial_share_and_the_sampling_warning(tmp_path):
    from diffusiondci.diffusion.dsdm_run import _warn_if_ema_is_mostly_initial
    from diffusiondci.runs.ema_share import ema_initial_share

    assert ema_initial_share(0.9999, False, 5000) == pytest.approx(0.9999**5000)  # ~61 %
    assert 0.60 < ema_initial_share(0.9999, False, 5000) < 0.62
    assert ema_initial_share(0.9999, True, 5000) < 1e-6  # the warm-up forgets the initialisation early
    assert ema_initial_share(0.99, True, 0) == 1.0
    record = {"training": {"ema_decay": 0.9999, "ema_warmup": False}}
    with pytest.warns(UserWarning, match="still 61% the random initialisation"):
        _warn_if_ema_is_mostly_initial(record, 5000, tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_ema_is_mostly_initial({"training": {"ema_decay": 0.9999, "ema_warmup": True}}, 5000, tmp_path)
        _warn_if_ema_is_mostly_initial({}, 10, tmp_path)  # older records: nothing to say
