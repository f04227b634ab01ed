"""Noise schedule and Gaussian diffusion maths of the DSDM generator (paper §III, eqs. 1–9).

:class:`DiffusionSchedule` holds every per-timestep coefficient in float64 (as improved DDPM
does) and knows nothing about networks: a network output is passed in as a tensor.

Where the betas come from
-------------------------
The betas are taken from a MONAI scheduler (``monai.networks.schedulers.Scheduler``) built on a
schedule registered with MONAI's ``NoiseSchedules`` registry. MONAI 1.6.1's own ``"cosine"``
entry already is improved DDPM's cosine schedule (ᾱ(t) = cos²(((t/T)+s)/(1+s)·π/2), s = 0.008,
β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999); it does *not* clip α to [1e-4, 0.9999] in this version), but
it evaluates it in float32, which puts a relative error of up to ~0.14 % on the small early betas
(β_1 ≈ 4e-5) and so on the posterior variance near t = 0, which the t = 0 decoder likelihood and
the learned variance depend on. We therefore register the same formula evaluated in float64 as
``"diffusiondci_cosine"`` (and improved DDPM's T-scaled linear schedule as
``"diffusiondci_linear"``) and build the MONAI scheduler with it. MONAI's ``DDPMScheduler`` is not
used for the reverse process: its ``learned_range`` interpolates the *variance* (not the log
variance) between the unclipped posterior variance and β_t, and it has no training-time L_vlb.

Timestep convention: index t ∈ {0, …, T−1} is the paper's step t+1 (improved DDPM's indexing);
index 0 is the last denoising step, whose reverse distribution is the decoder p(x_0 | x_1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum

import torch
from monai.networks.schedulers import NoiseSchedules, Scheduler

from diffusiondci.errors import UserInputError

__all__ = ["DiffusionSchedule", "ScheduleName", "evenly_spaced_timesteps", "extract"]

COSINE_S = 0.008  # s, offset of the cosine schedule (improved DDPM)
MAX_BETA = 0.999  # β clip of the cosine schedule (improved DDPM)


class ScheduleName(str, Enum):
    """Noise schedules understood by :class:`DiffusionSchedule`."""

    COSINE = "cosine"
    LINEAR = "linear"


@NoiseSchedules.add_def("diffusiondci_cosine", "Improved-DDPM cosine schedule in float64")
def _cosine_float64(num_train_timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), evaluated in float64."""
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * (math.pi / 2)) ** 2
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@NoiseSchedules.add_def("diffusiondci_linear", "Improved-DDPM linear schedule (scaled to T) in float64")
def _linear_float64(num_train_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear betas 1e-4 … 0.02 for T = 1000, scaled by 1000/T as improved DDPM does."""
    scale = 1000.0 / num_train_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_train_timesteps, dtype=torch.float64)


_REGISTRY_NAME = {ScheduleName.COSINE: "diffusiondci_cosine", ScheduleName.LINEAR: "diffusiondci_linear"}


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` (float64, length T) and broadcast (N,) → (N, 1, 1, 1) in ``like``'s dtype."""
    out = values.to(t.device)[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


def evenly_spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` indices from 0 to T−1 inclusive, evenly spaced (rounded), as in improved DDPM's respacing."""
    if not 1 <= steps <= num_timesteps:
        raise UserInputError(f"sampling steps must be between 1 and {num_timesteps} (training timesteps), got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


class DiffusionSchedule:
    """Forward process q and the Gaussian reverse-step maths for a fixed set of betas.

    Args:
        num_timesteps: T, the number of diffusion steps (paper: 1000).
        schedule: ``"cosine"`` (paper §V-A2, improved DDPM) or ``"linear"``.

    Attributes (all float64 tensors of length T on the CPU): ``betas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance`` (β̃_t),
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1``, ``posterior_mean_coef2``, ``log_betas``;
    ``timestep_map`` (LongTensor, T) maps indices of this schedule to the timesteps the network
    was trained with (the identity unless :meth:`respace` made it).
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str | ScheduleName = ScheduleName.COSINE):
        if int(num_timesteps) != num_timesteps or num_timesteps < 1:
            raise UserInputError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        try:
            name = ScheduleName(schedule)
        except ValueError:
            choices = ", ".join(s.value for s in ScheduleName)
            raise UserInputError(f"unknown noise schedule {schedule!r}; use one of: {choices}") from None
        monai_scheduler = Scheduler(num_train_timesteps=int(num_timesteps), schedule=_REGISTRY_NAME[name])
        self.schedule_name = name.value
        self._set_betas(monai_scheduler.betas.to(torch.float64), torch.arange(int(num_timesteps)))

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timestep_map: torch.Tensor | None = None) -> DiffusionSchedule:
        """A schedule with the given betas (e.g. a respaced one); ``timestep_map`` defaults to 0…T−1."""
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1]")
        self = cls.__new__(cls)
        self.schedule_name = "custom"
        self._set_betas(betas, torch.arange(betas.numel()) if timestep_map is None else timestep_map)
        return self

    def _set_betas(self, betas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        self.betas = betas
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).clone()
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # ᾱ_t (eq. 3)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t), β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is replaced by log β̃_1 (improved DDPM); with T = 1 there is no β̃_1, use β_0.
        first = self.posterior_variance[1:2] if betas.numel() > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)  # upper end of the learned-range log variance

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of this (possibly respaced) schedule."""
        return int(self.betas.numel())

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"DiffusionSchedule(num_timesteps={self.num_timesteps}, schedule={self.schedule_name!r})"

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (eq. 4)."""
        sqrt_a, sqrt_1ma = extract(self.sqrt_alphas_cumprod, t, x0), extract(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return sqrt_a * x0 + sqrt_1ma * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (eq. 4 solved for x_0)."""
        a = extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        return a * x_t - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t / √ᾱ_t − x_0) / √(1/ᾱ_t − 1), the inverse of :meth:`predict_x0_from_eps`."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """Mean and variance of p_θ(x_{t−1} | x_t) (eqs. 6–7) from a raw network output.

        ``model_output`` is (N, 2C, H, W): ε_θ, then v. The variance is improved DDPM's "learned
        range": log Σ = frac·log β_t + (1 − frac)·log β̃_t (clipped), frac = (v + 1)/2, so v = 1 gives
        β_t and v = −1 gives β̃_t. A (N, C, H, W) output (no variance channels) uses Σ = β̃_t.
        The mean is the posterior mean at x̂_0 (clamped to [−1, 1] when ``clip_denoised``), which
        equals eq. 7 when nothing is clamped.

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0`` and ``eps``.
        """
        channels = x_t.shape[1]
        if model_output.shape[1] == 2 * channels:
            eps, v = model_output[:, :channels], model_output[:, channels:]
            min_log = extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == channels:
            eps = model_output
            log_variance = extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; expected {channels} (ε) or {2 * channels} (ε, v)"
            )
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        variance = log_variance.exp()
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    # ------------------------------------------------------------------ respacing
    def respace(self, use_timesteps: Iterable[int]) -> DiffusionSchedule:
        """Keep a subset of timesteps (for fewer sampling steps, improved DDPM §4).

        The kept ᾱ values are unchanged; betas are recomputed as β_i = 1 − ᾱ_i / ᾱ_{i−1} over the
        kept indices. ``timestep_map`` of the result maps its indices to the original timesteps,
        which is what the network must be called with.
        """
        keep = sorted({int(i) for i in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise UserInputError(f"respaced timesteps must be a non-empty subset of 0..{self.num_timesteps - 1}")
        idx = torch.tensor(keep, dtype=torch.long)
        alpha_bar = self.alphas_cumprod[idx]
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        respaced = DiffusionSchedule.from_betas(1.0 - alpha_bar / alpha_bar_prev, self.timestep_map[idx])
        respaced.schedule_name = self.schedule_name
        return respaced
