"""Classifier-free guidance for the DSDM generator (paper §IV-B2c, eq. 17).

Training replaces the conditions (semantic mask, reference embedding) by null versions for some
samples (:func:`drop_conditions`); sampling mixes a conditional and a null prediction
(:func:`cfg_model_fn`), which turns a conditional network into the plain ``model_fn(x_t, t)``
callable the samplers take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["cfg_model_fn", "drop_conditions"]

PAPER_GUIDANCE_SCALE = 3.0  # s of eq. 17 used for all generation experiments in the paper


def _expand_like(null: torch.Tensor, ref: torch.Tensor, key: str) -> torch.Tensor:
    """Broadcast a null condition given for the whole batch, for one sample, or per sample to ``ref``."""
    null = null.to(device=ref.device, dtype=ref.dtype)
    if null.shape == ref.shape:
        return null
    if null.shape == ref.shape[1:]:
        return null.unsqueeze(0).expand_as(ref)
    if null.ndim == ref.ndim and null.shape[0] == 1 and null.shape[1:] == ref.shape[1:]:
        return null.expand_as(ref)
    raise ValueError(f"null condition {key!r} has shape {tuple(null.shape)}, not compatible with {tuple(ref.shape)}")


def _check_keys(cond: Mapping[str, torch.Tensor], null_cond: Mapping[str, torch.Tensor]) -> None:
    if set(cond) != set(null_cond):
        raise ValueError(f"cond and null_cond must have the same keys, got {sorted(cond)} and {sorted(null_cond)}")


def cfg_model_fn(
    model: Callable[..., torch.Tensor],
    cond: Mapping[str, torch.Tensor],
    null_cond: Mapping[str, torch.Tensor],
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap ``model(x, t, **cond) -> (N, 2C, H, W)`` into a guided ``model_fn(x, t)`` (eq. 17).

    ε̂ = ε_θ(x_t | y) + s·(ε_θ(x_t | y) − ε_θ(x_t | ∅)) on the ε channels; the variance channels come
    from the conditional pass (as SDM does). The conditional and null passes run as ONE forward
    call on a doubled batch (x, t and every condition concatenated: conditional first). ``s = 0``
    skips the null half and returns the conditional prediction unchanged. Null conditions may be
    given per sample, for one sample (no batch axis) or with batch size 1.
    """
    _check_keys(cond, null_cond)
    scale = float(scale)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 0.0:
            return model(x_t, t, **cond)
        both = {k: torch.cat([v, _expand_like(null_cond[k], v, k)]) for k, v in cond.items()}
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        out_c, out_u = out.chunk(2)
        channels = x_t.shape[1]
        eps_c, eps_u = out_c[:, :channels], out_u[:, :channels]
        return torch.cat([eps_c + scale * (eps_c - eps_u), out_c[:, channels:]], dim=1)

    return guided


def drop_conditions(
    cond: Mapping[str, torch.Tensor],
    null_cond: Mapping[str, torch.Tensor],
    p_mask: float,
    p_ref: float,
    p_both: float,
    generator: torch.Generator | None = None,
    mask_key: str = "mask",
    ref_key: str = "ref",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample condition dropout for classifier-free guidance training.

    Each sample falls into exactly one case, from one uniform draw: the mask alone is replaced by
    its null version with probability ``p_mask``, the reference alone with ``p_ref``, both with
    ``p_both``, neither with 1 − p_mask − p_ref − p_both (so P(mask dropped) = p_mask + p_both).
    Other keys of ``cond`` pass through unchanged.

    Returns:
        (mixed conditions, keep flags ``{mask_key: bool (N,), ref_key: bool (N,)}``; True = kept).
    """
    for name, p in (("p_mask", p_mask), ("p_ref", p_ref), ("p_both", p_both)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if p_mask + p_ref + p_both > 1.0 + 1e-9:
        raise ValueError(f"p_mask + p_ref + p_both must be <= 1, got {p_mask + p_ref + p_both}")
    for key in (mask_key, ref_key):
        if key not in cond or key not in null_cond:
            raise ValueError(f"condition {key!r} missing from cond or null_cond")
    n = cond[mask_key].shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    drop_mask_only = u < p_mask
    drop_ref_only = (u >= p_mask) & (u < p_mask + p_ref)
    drop_both = (u >= p_mask + p_ref) & (u < p_mask + p_ref + p_both)
    keep = {mask_key: ~(drop_mask_only | drop_both), ref_key: ~(drop_ref_only | drop_both)}

    mixed = dict(cond)
    for key in (mask_key, ref_key):
        value = cond[key]
        flag = keep[key].to(value.device).reshape((n,) + (1,) * (value.ndim - 1))
        mixed[key] = torch.where(flag, value, _expand_like(null_cond[key], value, key))
    return mixed, {k: v.to(cond[k].device) for k, v in keep.items()}
