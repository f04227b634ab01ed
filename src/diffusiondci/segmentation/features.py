"""Features of the frozen DSDM for segmentation (paper §IV-C1/C2, Fig. 3).

For an image ``x_0`` and a timestep ``t`` the image is noised with the forward process,
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (eq. 4), and passed through the frozen DSDM; the
outputs of chosen decoder blocks (the taps of :class:`~diffusiondci.models.unet.DSDMUNet`) are the
*diffusion features*. Features of several timesteps are concatenated along the channel axis.

No leakage: at test time the true mask is unknown, so the DSDM always gets the **NULL mask
condition** (valid because the generator was trained with classifier-free-guidance dropouts, and
what SPADE sees for an unlabelled image); the reference condition is the input image's own
embedding from the run's reference encoder, as during DSDM training. Nothing here accepts a mask.

Noise: ``eps`` for timestep ``t`` comes from a CPU generator seeded with ``(seed, t)``. With
``noise="shared"`` (the default) one noise field of the image's size is drawn and used for every
image of the batch, so an image's features depend on the image alone, not on the batch it is in or
its place there: that is what lets :mod:`.feature_cache` store them per image. ``noise="batch"``
(runs recorded before the cache) draws one field per batch position.

Precision: ``feature_dtype`` rounds the features to the dtype the cache stores (e.g. float16) and
returns them as float32, so features read from the cache and features computed afresh (inference)
are the same numbers.
Timesteps are 0-based network timesteps ``0 .. T-1``; the paper's "every 100th step in
[100, 1000]" is ``paper_probe_timesteps`` (1000 maps to T - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..diffusion.schedule import DiffusionSchedule
from ..errors import UserInputError
from ..models.reference_encoder import ReferenceEncoder
from ..models.unet import DSDMUNet
from ..runs.seeds import derive_seed

__all__ = ["FEATURE_DTYPES", "FEATURE_NOISE", "DiffusionFeatureExtractor", "paper_probe_timesteps"]

#: ``feature_noise`` options: one noise field for all images (``shared``) or one per batch position.
FEATURE_NOISE = ("shared", "batch")
#: ``feature_dtype`` options: the precision the features are rounded to (and cached in).
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def paper_probe_timesteps(num_timesteps: int = 1000, every: int = 100) -> list[int]:
    """The probe grid of Fig. 3: t = every, 2*every, ..., T (0-based, the last one clipped to T - 1)."""
    return sorted({min(t, num_timesteps - 1) for t in range(every, num_timesteps + 1, every)})


class DiffusionFeatureExtractor(nn.Module):
    """``images (N, 3, H, W) in [-1, 1] -> {block: (N, C_block * len(timesteps), h, w)}``.

    The DSDM and the encoder are frozen (``requires_grad_(False)``, eval mode) and stay so under
    ``.train()`` of a parent module.
    """

    def __init__(
        self,
        dsdm: DSDMUNet,
        schedule: DiffusionSchedule,
        encoder: ReferenceEncoder | None,
        blocks: Sequence[int],
        timesteps: Sequence[int],
        seed: int = 0,
        noise: str = "shared",
        feature_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if noise not in FEATURE_NOISE:
            raise UserInputError(f"feature noise must be one of {FEATURE_NOISE}, got {noise!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise UserInputError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
        blocks = sorted({int(b) for b in blocks})
        timesteps = [int(t) for t in timesteps]
        if not blocks or not timesteps:
            raise UserInputError("feature extraction needs at least one decoder block and one timestep")
        bad = [b for b in blocks if not 0 <= b < dsdm.num_decoder_blocks]
        if bad:
            raise UserInputError(
                f"decoder blocks {bad} do not exist: this DSDM has blocks 0..{dsdm.num_decoder_blocks - 1}"
            )
        bad_t = [t for t in timesteps if not 0 <= t < schedule.num_timesteps]
        if bad_t:
            raise UserInputError(f"timesteps {bad_t} outside 0..{schedule.num_timesteps - 1}")
        if dsdm.config.use_reference and encoder is None:
            raise UserInputError("this DSDM is reference-conditioned: its reference encoder is needed")
        self.dsdm = dsdm.eval().requires_grad_(False)
        self.encoder = encoder.eval().requires_grad_(False) if encoder is not None else None
        self.schedule = schedule
        self.blocks = blocks
        self.timesteps = timesteps
        self.seed = int(seed)
        self.noise = noise
        self.feature_dtype = feature_dtype

    def settings(self) -> dict:
        """What, besides the weights, decides the features (the feature cache's key)."""
        return {
            "blocks": list(self.blocks), "timesteps": list(self.timesteps), "seed": self.seed, "noise": self.noise,
            "feature_dtype": self.feature_dtype, "num_timesteps": self.schedule.num_timesteps,
            "noise_schedule": self.schedule.schedule_name, "null_mask": True,
            "reference": self.encoder is not None and bool(self.dsdm.config.use_reference),
        }

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        blocks: Sequence[int],
        timesteps: Sequence[int],
        seed: int = 0,
        checkpoint: str = "latest",
        device: str | torch.device | None = None,
        noise: str = "shared",
        feature_dtype: str = "float32",
    ) -> DiffusionFeatureExtractor:
        """Load the EMA weights of a ``train-dsdm`` run folder."""
        from ..diffusion.dsdm_run import load_dsdm

        model, schedule, info = load_dsdm(run_dir, checkpoint=checkpoint, ema=True, device=device or "cpu")
        return cls(model, schedule, info.encoder, blocks, timesteps, seed, noise, feature_dtype)

    def train(self, mode: bool = True) -> DiffusionFeatureExtractor:  # frozen: always eval
        super().train(False)
        return self

    @property
    def image_size(self) -> int:
        return int(self.dsdm.config.image_size)

    def feature_channels(self) -> dict[int, int]:
        """Channels of each block's concatenated features."""
        shapes = self.dsdm.decoder_feature_shapes
        return {b: shapes[b][0] * len(self.timesteps) for b in self.blocks}

    def feature_scale(self) -> dict[int, float]:
        """Feature side / image side of each block (e.g. 0.5 for a block at half resolution)."""
        shapes = self.dsdm.decoder_feature_shapes
        return {b: shapes[b][1] / self.image_size for b in self.blocks}

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> torch.Tensor | None:
        """The images' own reference embeddings (the encoder takes [-1, 1] images)."""
        if self.encoder is None or not self.dsdm.config.use_reference:
            return None
        return self.encoder(images)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{block: (N, C, h, w)}`` features of ``images``, always computed in fp32 (a caller's bf16
        autocast is switched off here), so cached features equal recomputed ones whatever the
        segmenter's precision."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._features(images)

    def _features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        ref = self.reference(images)
        n = images.shape[0]
        per_t: list[dict[int, torch.Tensor]] = []
        for t in self.timesteps:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, t))
            shape = (1, *images.shape[1:]) if self.noise == "shared" else images.shape
            noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(images.device, images.dtype)
            tt = torch.full((n,), t, dtype=torch.long, device=images.device)
            x_t = self.schedule.q_sample(images, tt, noise.expand_as(images))
            # mask=None is the NULL mask (zeros): the true mask never enters (see module docstring)
            feats = self.dsdm(x_t, tt, mask=None, ref=ref, return_features=self.blocks, features_only=True)
            per_t.append(feats)
        out = {b: torch.cat([f[b] for f in per_t], dim=1) for b in self.blocks}
        if self.feature_dtype != "float32":
            out = {b: f.to(FEATURE_DTYPES[self.feature_dtype]).float() for b, f in out.items()}
        return out
