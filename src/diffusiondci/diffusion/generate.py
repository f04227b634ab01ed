"""Generating images with a DSDM: classifier-free guided DDPM / DDIM / DPM-Solver++ sampling, seeded batch by batch.

:func:`generate` runs DDPM, DDIM or DPM-Solver++ (deterministic or SDE; :mod:`.samplers`) with classifier-free guidance (eq. 17,
:func:`.guidance.cfg_model_fn`, s = 3 by default) on label masks and reference embeddings. Batch
``b`` (of ``batch_size`` samples, in input order) draws all its noise from a CPU
``torch.Generator`` seeded with ``derive(seed, b)``: the same seed and batch size give the same
images bit for bit, on any device for the initial noise. For the unconditional baseline (no mask,
no reference) the guidance scale is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..device import resolve_autocast
from ..errors import UserInputError
from ..models.conditions import mask_one_hot
from ..models.unet import DSDMUNet
from ..runs.seeds import derive_seed
from .guidance import PAPER_GUIDANCE_SCALE, cfg_model_fn
from .samplers import DEFAULT_FRACTIONS, ModelFn, ddim_sample, ddpm_sample, dpmpp_sample
from .schedule import DiffusionSchedule

__all__ = ["DDIM_DEFAULT_STEPS", "SAMPLERS", "batch_generator", "check_sampler", "generate", "generate_batch",
           "guided_model_fn", "in_precision"]

SAMPLERS = ("ddpm", "ddim", "dpmpp", "dpmpp_sde", "dpmpp_karras", "dpmpp_sde_karras")
DDIM_DEFAULT_STEPS = 50


def in_precision(model: DSDMUNet, precision: str | None) -> Callable[..., torch.Tensor]:
    """``model`` itself (fp32), or a callable running it under bf16 autocast (``precision="bf16"``)
    whose output is cast back to float32, so that guidance and the sampler updates stay in fp32."""
    if precision is None:
        return model
    if precision != "bf16":
        raise ValueError(f"precision must be None or 'bf16', got {precision!r}")
    device_type = next(model.parameters()).device.type

    def run(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(x, t, **cond)
        return out.float()

    return run


def guided_model_fn(
    model: DSDMUNet, masks: torch.Tensor, refs: torch.Tensor | None, guidance: float = PAPER_GUIDANCE_SCALE,
    precision: str | None = None,
) -> ModelFn:
    """``model_fn(x_t, t)`` for the samplers, conditioned on ``masks`` (labels ``(N, H, W)``) and
    ``refs`` (``(N, D)`` embeddings; None = NULL reference) with guidance scale ``guidance`` (eq. 17).

    Only the conditions the architecture uses take part (the null pass replaces exactly those);
    with none (the unconditional baseline) the guidance scale is ignored. ``precision="bf16"`` runs
    the network under bf16 autocast (see :func:`in_precision`).
    """
    cfg = model.config
    dev = next(model.parameters()).device
    net = in_precision(model, precision)
    cond: dict[str, torch.Tensor] = {}
    null: dict[str, torch.Tensor] = {}
    if cfg.decoder_norm == "spade":
        cond["mask"] = mask_one_hot(masks.to(dev), cfg.num_mask_classes)
        null["mask"] = torch.zeros_like(cond["mask"][0])
    if cfg.use_reference:
        assert model.null_ref is not None
        null_ref = model.null_ref.detach()
        cond["ref"] = refs.to(dev, torch.float32) if refs is not None else null_ref.expand(masks.shape[0], -1)
        null["ref"] = null_ref
    if not cond or float(guidance) == 0.0:
        return lambda x, t: net(x, t, **cond)
    return cfg_model_fn(net, cond, null, float(guidance))


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UserInputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def generate_batch(
    model: DSDMUNet,
    schedule: DiffusionSchedule,
    masks: torch.Tensor,
    refs: torch.Tensor | None,
    sampler: str,
    steps: int | None,
    guidance: float,
    generator: torch.Generator,
    eta: float = 0.0,
    progress: bool | Callable[[int, int], None] = False,
    return_intermediates: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    precision: str | None = None,
):
    size = model.config.image_size
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (size, size):
        raise ValueError(f"masks must be (N, {size}, {size}) label maps, got {tuple(masks.shape)}")
    dev = next(model.parameters()).device
    fn = guided_model_fn(model, masks, refs, guidance, precision)
    shape = (masks.shape[0], model.config.in_channels, size, size)
    kw: dict[str, Any] = dict(
        device=dev, progress=progress, return_intermediates=return_intermediates,
        intermediate_fractions=fractions, intermediate_kind="x_t",
    )
    if sampler == "ddpm":
        return ddpm_sample(fn, schedule, shape, generator, steps=steps, **kw)
    if sampler.startswith("dpmpp"):
        return dpmpp_sample(fn, schedule, shape, generator, steps=steps or DDIM_DEFAULT_STEPS,
                            stochastic="_sde" in sampler, karras=sampler.endswith("_karras"), **kw)
    return ddim_sample(fn, schedule, shape, generator, steps=steps or DDIM_DEFAULT_STEPS, eta=eta, **kw)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator of batch ``batch_index`` of a run seeded with ``seed``."""
    return torch.Generator().manual_seed(derive_seed(int(seed), int(batch_index), 17))


@torch.no_grad()
def generate(
    model: DSDMUNet,
    schedule: DiffusionSchedule,
    masks: torch.Tensor,
    refs: torch.Tensor | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    guidance: float = PAPER_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool | Callable[[int, int], None] = False,
    eta: float = 0.0,
    return_intermediates: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    autocast: str | None = None,
):
    """Generate one image per mask: ``(N, 3, H, W)`` float in [-1, 1] on the CPU.

    Args:
        masks: ``(N, H, W)`` integer labels at the model's patch size.
        refs: ``(N, D)`` reference embeddings (None: the NULL reference).
        sampler: ``"ddpm"`` (ancestral, learned variance), ``"ddim"`` (eta = ``eta``), ``"dpmpp"``
            (DPM-Solver++(2M)) or ``"dpmpp_sde"`` (its stochastic form); ``_karras`` after either
            puts its steps on Karras et al.'s sigma schedule.
        steps: sampling steps; None = all T for DDPM, 50 for the others (respaced otherwise).
        guidance: s of eq. 17 (0 = the conditional prediction alone).
        seed: batch ``b`` uses a CPU generator seeded from ``(seed, b)``.
        progress: passed to the sampler of each batch (True = tqdm bar, or ``fn(step, total)``).
        return_intermediates: also return the x_t snapshots at ``fractions`` of the run, each
            ``(N, 3, H, W)``.
        autocast: the network's precision, as ``train-dsdm``'s setting: ``auto`` (bf16 where the
            hardware has it natively), ``bf16``, ``fp32`` / None.
    """
    check_sampler(sampler)
    precision = resolve_autocast(autocast, next(model.parameters()).device)
    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    masks = torch.as_tensor(masks).long()
    if refs is not None and refs.shape[0] != masks.shape[0]:
        raise ValueError(f"{refs.shape[0]} references for {masks.shape[0]} masks")
    outs: list[torch.Tensor] = []
    snaps: list[list[torch.Tensor]] = []
    for b, start in enumerate(range(0, masks.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        res = generate_batch(
            model, schedule, masks[sl], refs[sl] if refs is not None else None, sampler, steps, guidance,
            batch_generator(seed, b), eta, progress, return_intermediates, fractions, precision,
        )
        if return_intermediates:
            res, s = res
            snaps.append(s)
        outs.append(res.detach().float().cpu())
    images = torch.cat(outs) if outs else torch.zeros(0, 3, model.config.image_size, model.config.image_size)
    if return_intermediates:
        return images, [torch.cat([s[k] for s in snaps]) for k in range(len(fractions))] if snaps else []
    return images
