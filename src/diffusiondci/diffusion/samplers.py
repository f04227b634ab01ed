"""Samplers for the DSDM generator: each is one function with the same signature.

``model_fn(x_t, t) -> (N, 2C, H, W)`` is any callable (conditions closed over, e.g. by
:func:`diffusiondci.diffusion.guidance.cfg_model_fn`); ``t`` given to it is always the ORIGINAL
training timestep (a respaced schedule's ``timestep_map``). All randomness comes from the passed
``torch.Generator``, so a seed reproduces a sample bit for bit on the same device.

Common keyword arguments:
    clip_denoised: clamp x̂_0 to [−1, 1] at every step.
    noise: optional x_T (defaults to N(0, I) drawn from ``generator``).
    device / dtype: where and in what precision to run (default: the generator's device, float32).
    progress: ``True`` for a progress bar (plain lines off a terminal), or a callable ``progress(step, total)``
    called after each step.
    return_intermediates: also return snapshots for denoising strips (paper Fig. 5).
    intermediate_fractions: when to snapshot, as fractions of the run (0 = first step, 1 = last).
    intermediate_kind: ``"pred_x0"`` (x̂_0 at that step) or ``"x_t"`` (the state after that step).

Each returns the sample (N, C, H, W), or ``(sample, snapshots)`` with ``return_intermediates``,
snapshots being CPU tensors in the order of ``intermediate_fractions``.

:func:`dpmpp_sample` is DPM-Solver++(2M) (Lu et al. 2022) from diffusers'
``DPMSolverMultistepScheduler``, given this schedule's betas, deterministic or (``stochastic``)
its SDE form; the learned-variance channels are not used by it (nor by DDIM).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from diffusiondci.diffusion.schedule import DiffusionSchedule, evenly_spaced_timesteps, extract

__all__ = ["ddim_sample", "ddpm_sample", "dpmpp_sample", "ModelFn"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved (keeps CPU seeds device independent)."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _start(
    noise: torch.Tensor | None, shape: Sequence[int], generator: torch.Generator,
    device: torch.device | str | None, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.device]:
    """x_T (``noise``, else N(0, I) from ``generator``) and the device the sampler runs on
    (default: the generator's)."""
    dev = torch.device(device) if device is not None else generator.device
    x = noise.to(device=dev, dtype=dtype) if noise is not None else _randn(shape, generator, dev, dtype)
    return x, dev


def _snapshot_steps(total: int, fractions: Sequence[float]) -> list[int]:
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"intermediate_fractions must lie in [0, 1], got {list(fractions)}")
    return [round(f * (total - 1)) for f in fractions]


class _Loop:
    """Progress reporting and intermediate snapshots shared by the samplers."""

    def __init__(self, total: int, progress: bool | ProgressFn, record: bool, fractions: Sequence[float], kind: str):
        if kind not in ("pred_x0", "x_t"):
            raise ValueError(f"intermediate_kind must be 'pred_x0' or 'x_t', got {kind!r}")
        self.total, self.kind, self.record = total, kind, record
        self.wanted = _snapshot_steps(total, fractions) if record else []
        self.snaps: dict[int, torch.Tensor] = {}
        self.bar = None
        self.callback: ProgressFn | None = None
        if progress is True:
            from ..progress import progress_bar  # a bar on a terminal, plain lines in a log

            self.bar = progress_bar(total, "denoising", unit="step", leave=False)
        elif callable(progress):
            self.callback = progress

    def step(self, k: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if self.record and k in self.wanted:
            self.snaps[k] = (pred_x0 if self.kind == "pred_x0" else x_t).detach().cpu().clone()
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(k + 1, self.total)

    def finish(self, x: torch.Tensor):
        if self.bar is not None:
            self.bar.close()
        if not self.record:
            return x
        return x, [self.snaps[k] for k in self.wanted]


def _prepare(schedule: DiffusionSchedule, steps: int | None) -> DiffusionSchedule:
    if steps is None or steps == schedule.num_timesteps:
        return schedule
    return schedule.respace(evenly_spaced_timesteps(schedule.num_timesteps, steps))


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    generator: torch.Generator,
    steps: int | None = None,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | ProgressFn = False,
    return_intermediates: bool = False,
    intermediate_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    intermediate_kind: str = "pred_x0",
):
    """Ancestral DDPM sampling with the learned variance (Ho et al. 2020 Alg. 2; paper eq. 9).

    x_{t−1} = μ_θ(x_t, t) + Σ_θ^{1/2} z, z ~ N(0, I) (no noise at the last step). ``steps=None``
    runs all T steps; ``steps=k`` runs improved DDPM's respaced chain on k evenly spaced timesteps
    (0 and T−1 included), calling the network with the original timestep indices.
    """
    sched = _prepare(schedule, steps)
    x, device = _start(noise, shape, generator, device, dtype)
    n, total = x.shape[0], sched.num_timesteps
    tmap = sched.timestep_map.to(device)
    loop = _Loop(total, progress, return_intermediates, intermediate_fractions, intermediate_kind)
    for k, i in enumerate(reversed(range(total))):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        out = sched.p_mean_variance(model_fn(x, tmap[t]), x, t, clip_denoised=clip_denoised)
        x = out["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * _randn(x.shape, generator, device, dtype)
        loop.step(k, x, out["pred_x0"])
    return loop.finish(x)


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    generator: torch.Generator,
    steps: int | None = 50,
    eta: float = 0.0,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | ProgressFn = False,
    return_intermediates: bool = False,
    intermediate_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    intermediate_kind: str = "pred_x0",
):
    """DDIM sampling (Song et al. 2021, eq. 12) on ``steps`` evenly spaced timesteps.

    x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z with
    σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}); η = 0 is deterministic given x_T.
    ε̂ is recomputed from the (clipped) x̂_0, as in improved DDPM; the variance channels are unused.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sched = _prepare(schedule, steps)
    x, device = _start(noise, shape, generator, device, dtype)
    n, total, channels = x.shape[0], sched.num_timesteps, x.shape[1]
    tmap = sched.timestep_map.to(device)
    loop = _Loop(total, progress, return_intermediates, intermediate_fractions, intermediate_kind)
    for k, i in enumerate(reversed(range(total))):
        t = torch.full((n,), i, device=device, dtype=torch.long)
        eps = model_fn(x, tmap[t])[:, :channels]
        pred_x0 = sched.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        eps = sched.predict_eps_from_x0(x, t, pred_x0)
        a_t = extract(sched.alphas_cumprod, t, x)
        a_prev = extract(sched.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
        x = a_prev.sqrt() * pred_x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * eps
        if i > 0 and eta > 0:
            x = x + sigma * _randn(x.shape, generator, device, dtype)
        loop.step(k, x, pred_x0)
    return loop.finish(x)


@torch.no_grad()
def dpmpp_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: Sequence[int],
    generator: torch.Generator,
    steps: int = 25,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | ProgressFn = False,
    return_intermediates: bool = False,
    intermediate_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    intermediate_kind: str = "pred_x0",
    stochastic: bool = False,
    karras: bool = False,
):
    """DPM-Solver++(2M) in ``steps`` network evaluations (diffusers' ``DPMSolverMultistepScheduler``
    on this schedule's betas, first order at the last step): deterministic, or with ``stochastic``
    its SDE form (``sde-dpmsolver++``, Lu et al. 2022), whose fresh noise per step comes from
    ``generator``. The noise levels are spread evenly in time from T-1 down, or with ``karras`` on
    Karras et al. (2022)'s sigma schedule (rho = 7), which puts more of the steps at both ends.
    ``clip_denoised`` clamps its x̂_0 to [−1, 1] (diffusers' thresholding with a maximum of 1).
    ``schedule`` must be the full training schedule, not a respaced one."""
    from diffusers import DPMSolverMultistepScheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps)):
        raise ValueError("dpmpp_sample needs the full training schedule, not a respaced one")
    x, device = _start(noise, shape, generator, device, dtype)
    with warnings.catch_warnings():  # diffusers 0.42 calls np.array on a tensor (a NumPy 2 deprecation)
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.double().cpu().numpy(),
            solver_order=2, algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++",
            prediction_type="epsilon", thresholding=clip_denoised,
            sample_max_value=1.0, lower_order_final=True, use_karras_sigmas=karras,
        )
        solver.set_timesteps(steps, device=device)
        # Karras sigmas of the cosine schedule round to repeated timesteps near T (999, 999, ...);
        # diffusers would then start at the second 999 and step past its last sigma
        solver.set_begin_index(0)
    n, channels = x.shape[0], x.shape[1]
    loop = _Loop(len(solver.timesteps), progress, return_intermediates, intermediate_fractions, intermediate_kind)
    for k, step_t in enumerate(solver.timesteps):
        t = torch.full((n,), int(step_t), device=device, dtype=torch.long)
        eps = model_fn(x, t)[:, :channels]
        pred_x0 = schedule.predict_x0_from_eps(x, t, eps)
        noise_k = _randn(x.shape, generator, device, x.dtype) if stochastic else None
        x = solver.step(eps, step_t, x, variance_noise=noise_k).prev_sample.to(dtype)
        loop.step(k, x, pred_x0.clamp(-1.0, 1.0) if clip_denoised else pred_x0)
    return loop.finish(x)
