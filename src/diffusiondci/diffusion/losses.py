"""Hybrid training loss of the DSDM generator (paper eqs. 14–16, improved DDPM).

λ convention (``lambda_vlb``)
-----------------------------
``vlb`` returned per sample is the *per-timestep* bound term L_t in bits per dimension:
KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0 and the decoder NLL −log p_θ(x_0|x_1) at
t = 0. The full bound is L_vlb = Σ_t L_t, estimated by T·L_t for a uniformly drawn t, and the loss is

    loss = L_simple + lambda_vlb · (T · L_t),        lambda_vlb = 0.001 by default (eq. 14).

This is exactly improved DDPM's hybrid objective (it adds L_t · T/1000 to the MSE) for every T;
with T = 1000 it is simply L_simple + L_t. Note the paper's eq. 16 writes the KL with the arguments
swapped; the bound (and improved DDPM) uses KL(q ‖ p_θ), which is what is computed here.

The bound term is computed on a copy of the network output whose ε part is detached, so L_vlb
trains only the variance channels and L_simple only the ε channels (improved DDPM §3.1).
"""

from __future__ import annotations

import math

import torch

from diffusiondci.diffusion.schedule import DiffusionSchedule

__all__ = [
    "LOSS_WEIGHTINGS",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "min_snr_weights",
    "normal_kl",
    "timestep_sampler",
]

#: ``loss_weighting`` options for the L_simple term: uniform over t, or min-SNR-gamma.
LOSS_WEIGHTINGS = ("none", "min_snr")

LAMBDA_VLB = 0.001  # λ of eq. 14 (improved DDPM)
_LOG2 = math.log(2.0)
_BIN = 1.0 / 255.0  # half-width of an 8-bit bin on [−1, 1]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data ``x`` in [−1, 1] under N(means, e^{2·log_scales}).

    Each value owns the bin [x − 1/255, x + 1/255]; the lowest bin (x = −1) extends to −∞ and the
    highest (x = 1) to +∞ (Ho et al. 2020 eq. 13, improved DDPM). Unlike improved DDPM, which uses a
    tanh approximation of Φ, the exact normal CDF is used, with ``log_ndtr`` for the edge bins and the
    upper-tail form Φ(−a) − Φ(−b) for interior bins right of the mean, so tails do not cancel.
    """
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + _BIN)
    lower = inv_std * (x - means - _BIN)
    ndtr = torch.special.ndtr
    right_tail = lower > 0
    mass = torch.where(right_tail, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    interior = torch.log(mass.clamp(min=1e-12))
    left_edge = torch.special.log_ndtr(upper)  # log Φ(upper): bin (−∞, −1 + 1/255]
    right_edge = torch.special.log_ndtr(-lower)  # log (1 − Φ(lower)): bin [1 − 1/255, ∞)
    return torch.where(x < -0.999, left_edge, torch.where(x > 0.999, right_edge, interior))


def timestep_sampler(
    n: int, num_timesteps: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``n`` timesteps drawn uniformly from {0, …, T−1} (eq. 8), as a LongTensor."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def min_snr_weights(schedule: DiffusionSchedule, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weights of the eps-MSE (Hang et al. 2023): ``min(SNR_t, gamma) / SNR_t``.

    ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``. The eps-loss of a low-noise step (large SNR) is
    down-weighted so that the many nearly clean timesteps do not dominate the gradient; steps with
    ``SNR_t <= gamma`` keep weight 1. Returns float32 ``(N,)`` on ``t``'s device.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    abar = schedule.alphas_cumprod[t.cpu()]
    snr = abar / (1.0 - abar)
    return (snr.clamp(max=gamma) / snr).float().to(t.device)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def hybrid_loss(
    schedule: DiffusionSchedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    lambda_vlb: float = LAMBDA_VLB,
    mask: torch.Tensor | None = None,
    reduction: str = "none",
    mse_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """L_hybrid = L_simple + λ·L_vlb (eqs. 14–16); see the module docstring for the λ convention.

    Args:
        schedule: the training schedule (T steps; ``t`` indexes it).
        model_output: (N, 2C, H, W) network output at (x_t, t): ε_θ then v (learned-range variance).
            A (N, C, H, W) output is accepted; its vlb uses Σ = β̃_t and carries no gradient.
        x0, x_t, noise: (N, C, H, W) clean image in [−1, 1], x_t = q_sample(x0, t, noise), and ε.
        t: (N,) LongTensor of timesteps.
        lambda_vlb: λ, weight of the full-bound estimate T·L_t.
        mask: optional (N,) per-sample weights.
        reduction: ``"none"`` returns (N,) tensors (multiplied by ``mask`` if given); ``"mean"``
            returns the ``mask``-weighted means (Σ w·l / Σ w).
        mse_weights: optional (N,) weights of the L_simple term only (e.g. :func:`min_snr_weights`);
            ``mse`` is reported unweighted, ``loss`` uses the weighted term.

    Returns:
        dict with ``loss``, ``mse`` (L_simple, mean over C, H, W) and ``vlb`` (L_t in bits/dim).
    """
    if model_output.dtype in (torch.float16, torch.bfloat16):  # bound terms need float32 (log-variances, CDFs)
        model_output = model_output.float()
    channels = x_t.shape[1]
    eps = model_output[:, :channels]
    mse = _per_sample_mean((noise - eps) ** 2)

    # L_vlb trains only the variance: the ε part of the output is detached.
    frozen = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
    if model_output.shape[1] == channels:
        frozen = frozen.detach()
    p = schedule.p_mean_variance(frozen, x_t, t, clip_denoised=False)
    true_mean, _, true_log_variance = schedule.q_posterior_mean_variance(x0, x_t, t)
    kl = _per_sample_mean(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / _LOG2
    nll = -_per_sample_mean(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / _LOG2
    vlb = torch.where(t.to(kl.device) == 0, nll, kl)

    simple = mse if mse_weights is None else mse * mse_weights.to(mse)
    loss = simple + lambda_vlb * schedule.num_timesteps * vlb
    terms = {"loss": loss, "mse": mse, "vlb": vlb}
    if reduction == "none":
        if mask is None:
            return terms
        w = mask.to(loss)
        return {k: v * w for k, v in terms.items()}
    if reduction == "mean":
        if mask is None:
            return {k: v.mean() for k, v in terms.items()}
        w = mask.to(loss)
        total = w.sum().clamp(min=torch.finfo(w.dtype).tiny)
        return {k: (v * w).sum() / total for k, v in terms.items()}
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
