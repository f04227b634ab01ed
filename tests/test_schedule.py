"""Closed-form checks of diffusiondci.diffusion.schedule (paper eqs. 1–7)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusiondci.diffusion.schedule import DiffusionSchedule, evenly_spaced_timesteps, extract
from diffusiondci.errors import UserInputError


def _cosine_alpha_bar(t: int, T: int, s: float = 0.008) -> float:
    return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_alpha_bar_matches_formula_and_beta_clip():
    T = 1000
    sched = DiffusionSchedule(T, "cosine")
    assert sched.betas.dtype == torch.float64 and sched.betas.shape == (T,)
    assert float(sched.betas.max()) <= 0.999
    assert math.isclose(float(sched.betas[-1]), 0.999)  # the last beta is the clipped one
    # where no beta was clipped, ᾱ_t (index t = paper step t+1) = f(t+1) / f(0)
    f0 = _cosine_alpha_bar(0, T)
    expected = torch.tensor([_cosine_alpha_bar(i + 1, T) / f0 for i in range(T)], dtype=torch.float64)
    unclipped = sched.betas < 0.999
    assert int(unclipped.sum()) >= T - 2
    torch.testing.assert_close(sched.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-10, atol=1e-14)


def test_linear_schedule_endpoints_scale_with_T():
    b1000 = DiffusionSchedule(1000, "linear").betas
    assert math.isclose(float(b1000[0]), 1e-4) and math.isclose(float(b1000[-1]), 0.02)
    b500 = DiffusionSchedule(500, "linear").betas
    assert math.isclose(float(b500[0]), 2e-4) and math.isclose(float(b500[-1]), 0.04)


def test_bad_schedule_arguments_raise_user_error():
    with pytest.raises(UserInputError, match="unknown noise schedule"):
        DiffusionSchedule(10, "quadratic")
    with pytest.raises(UserInputError):
        DiffusionSchedule(0)
    with pytest.raises(UserInputError):
        evenly_spaced_timesteps(10, 11)


def test_extract_broadcasts_in_input_dtype():
    sched = DiffusionSchedule(10)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    out = extract(sched.betas, torch.tensor([0, 5, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), sched.betas[[0, 5, 9]].float())


def test_q_sample_mean_and_variance_statistics():
    sched = DiffusionSchedule(1000)
    g = torch.Generator().manual_seed(0)
    n, x0_value = 200_000, 0.5
    for step in (10, 500, 900):
        x0 = torch.full((n, 1, 1, 1), x0_value, dtype=torch.float64)
        t = torch.full((n,), step, dtype=torch.long)
        x_t = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        a_bar = _cosine_alpha_bar(step + 1, 1000) / _cosine_alpha_bar(0, 1000)
        assert abs(float(x_t.mean()) - math.sqrt(a_bar) * x0_value) < 5 * math.sqrt((1 - a_bar) / n) + 1e-9
        assert abs(float(x_t.var()) - (1 - a_bar)) < 0.01 * (1 - a_bar) + 1e-9


def test_posterior_equals_bayes_closed_form():
    """q(x_{t−1}|x_t,x_0) ∝ N(x_{t−1}; √ᾱ_{t−1}x_0, 1−ᾱ_{t−1}) · N(x_t; √α_t x_{t−1}, β_t)."""
    sched = DiffusionSchedule(200)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 7, 50, 199])
    x0 = torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    mean, var, log_var = sched.q_posterior_mean_variance(x0, x_t, t)
    for row, step in enumerate(t.tolist()):
        a_bar = float(torch.prod(1 - sched.betas[: step + 1]))
        a_bar_prev = float(torch.prod(1 - sched.betas[:step]))
        beta = float(sched.betas[step])
        precision = 1 / (1 - a_bar_prev) + (1 - beta) / beta
        post_var = 1 / precision
        post_mean = post_var * (
            math.sqrt(a_bar_prev) * x0[row] / (1 - a_bar_prev) + math.sqrt(1 - beta) * x_t[row] / beta
        )
        torch.testing.assert_close(mean[row], post_mean, rtol=1e-9, atol=1e-12)
        assert math.isclose(float(var[row]), post_var, rel_tol=1e-9)
        assert math.isclose(float(log_var[row]), math.log(post_var), rel_tol=1e-9)


def test_posterior_log_variance_at_t0_is_clipped_to_t1():
    sched = DiffusionSchedule(100)
    assert float(sched.posterior_variance[0]) == 0.0
    assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(math.log(float(sched.posterior_variance[1])))


def test_predict_x0_inverts_q_sample():
    sched = DiffusionSchedule(1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 800, 998])
    x_t = sched.q_sample(x0, t, eps)
    torch.testing.assert_close(sched.predict_x0_from_eps(x_t, t, eps), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sched.predict_eps_from_x0(x_t, t, x0), eps, rtol=1e-8, atol=1e-8)


def test_p_mean_variance_learned_range_endpoints_and_eq7_mean():
    sched = DiffusionSchedule(1000)
    g = torch.Generator().manual_seed(3)
    n, c = 4, 3
    t = torch.tensor([0, 1, 400, 999])
    x_t = torch.randn(n, c, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, c, 2, 2, generator=g, dtype=torch.float64) * 0.1
    for v, expected in ((1.0, sched.betas[t]), (-1.0, sched.posterior_variance[t])):
        out = sched.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], 1), x_t, t, clip_denoised=False)
        for row in range(1, n):  # row 0 (t = 0): β̃_0 = 0 is clipped to β̃_1
            torch.testing.assert_close(out["variance"][row], torch.full_like(x_t[row], float(expected[row])))
        # eq. 7 with α_t = 1 − β_t: μ = (x_t − β_t/√(1−ᾱ_t) ε) / √α_t
        beta = sched.betas[t].view(-1, 1, 1, 1)
        a_bar = torch.cumprod(1 - sched.betas, 0)[t].view(-1, 1, 1, 1)
        mu = (x_t - beta / torch.sqrt(1 - a_bar) * eps) / torch.sqrt(1 - beta)
        torch.testing.assert_close(out["mean"], mu, rtol=1e-7, atol=1e-9)
    v0 = sched.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), x_t, t, clip_denoised=False)
    geo = torch.sqrt(sched.betas[t] * sched.posterior_variance[t])  # v = 0 is the geometric mean
    torch.testing.assert_close(v0["variance"][1:, 0, 0, 0], geo[1:])


def test_p_mean_variance_clips_pred_x0():
    sched = DiffusionSchedule(100)
    x_t = torch.full((1, 1, 2, 2), 5.0)
    out = sched.p_mean_variance(torch.zeros(1, 2, 2, 2), x_t, torch.tensor([50]), clip_denoised=True)
    assert float(out["pred_x0"].max()) == 1.0
    with pytest.raises(ValueError):
        sched.p_mean_variance(torch.zeros(1, 3, 2, 2), x_t, torch.tensor([50]))


def test_respace_all_steps_equals_original():
    sched = DiffusionSchedule(300)
    same = sched.respace(range(300))
    names = ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1")
    for name in names:
        torch.testing.assert_close(getattr(same, name), getattr(sched, name), rtol=1e-9, atol=1e-15)
    assert torch.equal(same.timestep_map, torch.arange(300))


def test_respaced_alpha_bar_matches_kept_steps_and_map_composes():
    sched = DiffusionSchedule(1000)
    keep = evenly_spaced_timesteps(1000, 25)
    assert len(keep) == 25 and keep[0] == 0 and keep[-1] == 999
    sub = sched.respace(keep)
    assert sub.num_timesteps == 25
    torch.testing.assert_close(sub.alphas_cumprod, sched.alphas_cumprod[keep], rtol=1e-12, atol=1e-15)
    assert sub.timestep_map.tolist() == keep
    # β_i = 1 − ᾱ_i / ᾱ_{i−1} over kept indices, β_0 = 1 − ᾱ_{keep[0]}
    assert float(sub.betas[0]) == pytest.approx(1 - float(sched.alphas_cumprod[0]))
    a_bar = sched.alphas_cumprod
    assert float(sub.betas[3]) == pytest.approx(1 - float(a_bar[keep[3]] / a_bar[keep[2]]))
    subsub = sub.respace([0, 10, 24])
    assert subsub.timestep_map.tolist() == [keep[0], keep[10], keep[24]]
    torch.testing.assert_close(subsub.alphas_cumprod, sched.alphas_cumprod[subsub.timestep_map])
