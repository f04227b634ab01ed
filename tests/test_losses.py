"""Closed-form checks of diffusiondci.diffusion.losses (paper eqs. 14–16)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusiondci.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    timestep_sampler,
)
from diffusiondci.diffusion.schedule import DiffusionSchedule


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))


def test_discretized_likelihood_matches_normal_cdf_bin_masses():
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor([0, 1, 7, 100, 127, 128, 200, 254, 255])
    x = (levels.double() / 127.5 - 1).repeat(20)
    means = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.rand(x.shape, generator=g, dtype=torch.float64) * 4 - 4.5
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    dist = Normal(means, torch.exp(log_scales))
    upper = torch.where(levels.repeat(20) == 255, torch.full_like(x, math.inf), x + 1 / 255)
    lower = torch.where(levels.repeat(20) == 0, torch.full_like(x, -math.inf), x - 1 / 255)
    mass = dist.cdf(upper) - dist.cdf(lower)
    ok = mass > 1e-10  # compare where the reference difference is numerically meaningful
    torch.testing.assert_close(got[ok], torch.log(mass[ok]), rtol=1e-6, atol=1e-8)
    assert ok.float().mean() > 0.5


def test_discretized_likelihood_sums_to_one_over_all_bins():
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, -2.0), (-0.95, -1.0), (0.6, 0.5)):
        logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def _setup(seed=0, n=4, c=3, hw=4, T=100):
    g = torch.Generator().manual_seed(seed)
    sched = DiffusionSchedule(T)
    x0 = (torch.randint(0, 256, (n, c, hw, hw), generator=g).float() / 127.5) - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, T // 2, T - 1][:n])
    x_t = sched.q_sample(x0, t, noise)
    out = torch.randn(n, 2 * c, hw, hw, generator=g) * 0.5
    return sched, x0, noise, t, x_t, out


def test_mse_matches_manual_and_loss_combines_terms():
    sched, x0, noise, t, x_t, out = _setup()
    terms = hybrid_loss(sched, out, x0, x_t, t, noise, lambda_vlb=0.001)
    manual = ((noise - out[:, :3]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], manual)
    torch.testing.assert_close(terms["loss"], manual + 0.001 * 100 * terms["vlb"])
    assert terms["loss"].shape == (4,)


def test_vlb_equals_independent_kl_and_decoder_nll():
    sched, x0, noise, t, x_t, out = _setup(seed=3)
    x0, noise, x_t, out = x0.double(), noise.double(), x_t.double(), out.double()
    vlb = hybrid_loss(sched, out, x0, x_t, t, noise)["vlb"]
    for row, step in enumerate(t.tolist()):
        beta = float(sched.betas[step])
        a_bar = float(torch.prod(1 - sched.betas[: step + 1]))
        a_bar_prev = float(torch.prod(1 - sched.betas[:step]))
        eps, v = out[row, :3], out[row, 3:]
        mu_p = (x_t[row] - beta / math.sqrt(1 - a_bar) * eps) / math.sqrt(1 - beta)  # eq. 7
        post_var = beta * (1 - a_bar_prev) / (1 - a_bar)
        # β̃_0 = 0, so its log is clipped to log β̃_1 = log(β_1 (1 − ᾱ_0) / (1 − ᾱ_1))
        b0, b1 = float(sched.betas[0]), float(sched.betas[1])
        clipped_t1 = b1 * b0 / (1 - (1 - b0) * (1 - b1))
        min_log = math.log(post_var if step > 0 else clipped_t1)
        log_var_p = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * min_log
        p = Normal(mu_p, torch.exp(0.5 * log_var_p))
        if step > 0:
            post_mean = post_var * (
                math.sqrt(a_bar_prev) * x0[row] / (1 - a_bar_prev) + math.sqrt(1 - beta) * x_t[row] / beta
            )
            q = Normal(post_mean, torch.full_like(post_mean, math.sqrt(post_var)))
            expected = kl_divergence(q, p).mean() / math.log(2)
        else:
            up = torch.where(x0[row] > 0.999, torch.full_like(mu_p, math.inf), x0[row] + 1 / 255)
            lo = torch.where(x0[row] < -0.999, torch.full_like(mu_p, -math.inf), x0[row] - 1 / 255)
            expected = -torch.log(p.cdf(up) - p.cdf(lo)).mean() / math.log(2)
        assert float(vlb[row]) == pytest.approx(float(expected), rel=1e-6)


def test_vlb_is_zero_for_oracle_eps_and_posterior_variance():
    sched, x0, noise, t, x_t, _ = _setup(seed=4)
    oracle = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = −1 → Σ = β̃_t
    vlb = hybrid_loss(sched, oracle.double(), x0.double(), x_t.double(), t, noise.double())["vlb"]
    assert torch.allclose(vlb[1:], torch.zeros(3, dtype=torch.float64), atol=1e-8)
    assert float(vlb[0]) > 0  # the decoder NLL is not a KL


def test_vlb_gradient_reaches_only_variance_channels():
    sched, x0, noise, t, x_t, out = _setup(seed=5)
    out = out.clone().requires_grad_(True)
    terms = hybrid_loss(sched, out, x0, x_t, t, noise)
    (grad_vlb,) = torch.autograd.grad(terms["vlb"].sum(), out, retain_graph=True)
    assert torch.count_nonzero(grad_vlb[:, :3]) == 0
    assert torch.count_nonzero(grad_vlb[:, 3:]) > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.count_nonzero(grad_mse[:, 3:]) == 0
    assert torch.count_nonzero(grad_mse[:, :3]) > 0


def test_mask_and_reduction():
    sched, x0, noise, t, x_t, out = _setup(seed=6)
    per = hybrid_loss(sched, out, x0, x_t, t, noise)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    mean = hybrid_loss(sched, out, x0, x_t, t, noise, mask=w, reduction="mean")
    torch.testing.assert_close(mean["loss"], (per["loss"] * w).sum() / w.sum())
    torch.testing.assert_close(hybrid_loss(sched, out, x0, x_t, t, noise, reduction="mean")["mse"], per["mse"].mean())
    with pytest.raises(ValueError):
        hybrid_loss(sched, out, x0, x_t, t, noise, reduction="sum")


def test_timestep_sampler_uniform_and_seeded():
    a = timestep_sampler(20_000, 10, torch.Generator().manual_seed(7))
    b = timestep_sampler(20_000, 10, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert int(a.min()) == 0 and int(a.max()) == 9
    counts = torch.bincount(a, minlength=10).float() / 20_000
    assert torch.all((counts - 0.1).abs() < 0.01)
