"""SimCLR pre-training pieces for the reference encoder (paper §IV-B2a, Chen et al. 2020 [43]).

The paper trains its ResNet-18 reference encoder "with the contrastive learning strategy proposed
in [43]": two random augmentations of each image are embedded, passed through a small MLP
projection head ``g``, and pulled together by the NT-Xent loss (SimCLR eq. 1) while all other
views in the batch act as negatives. After training the head is discarded; the 512-d encoder
output is the reference embedding used by DSDM.

Only pure, reusable pieces live here (augmentation, head, loss, one step); embedding a dataset with
the trained encoder is :func:`diffusiondci.models.embedding.embed_dataset`, the run folder and CLI
wiring are in :mod:`.encoder`.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from monai.losses import ContrastiveLoss
from torch import nn

#: Below this temperature ``exp(1/T)`` overflows float32 inside MONAI's ContrastiveLoss.
MIN_TEMPERATURE = 0.02


class SimCLRAugment(nn.Module):
    """Produce two independently augmented views of a batch (SimCLR §3 augmentation family).

    Random resized crop to ``out_size``, horizontal and vertical flips (slides have no canonical
    orientation), colour jitter with probability ``p_jitter``, optional random grayscale and
    random Gaussian blur (kernel ~10% of ``out_size``, sigma in [0.1, 2.0]), all from
    ``kornia.augmentation``. Input and output are ``N x 3 x H x W`` float in [-1, 1]; kornia works
    in [0, 1] internally. Random draws come from torch's global RNG, so a fixed
    ``torch.manual_seed`` gives identical views. Runs on any device (CPU included).

    Colour carries signal in DCI (PSD-derived hue), so the defaults are milder than SimCLR's
    (jitter strength 0.4/0.4/0.4/0.1 instead of 0.8/0.8/0.8/0.2, grayscale off); pass the paper's
    SimCLR values explicitly to reproduce them.
    """

    def __init__(
        self,
        out_size: int | tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        p_jitter: float = 0.8,
        p_gray: float = 0.0,
        p_blur: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ):
        super().__init__()
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        self.out_size = (int(size[0]), int(size[1]))
        kernel = max(3, int(0.1 * min(self.out_size)) // 2 * 2 + 1)  # odd, ~10% of the side
        brightness, contrast, saturation, hue = jitter
        ops: list[nn.Module] = [
            K.RandomResizedCrop(self.out_size, scale=scale),
            K.RandomHorizontalFlip(p=0.5),
            K.RandomVerticalFlip(p=0.5),
            K.ColorJitter(brightness, contrast, saturation, hue, p=p_jitter),
        ]
        if p_gray > 0:
            ops.append(K.RandomGrayscale(p=p_gray))
        if p_blur > 0:
            ops.append(K.RandomGaussianBlur((kernel, kernel), blur_sigma, p=p_blur))
        self.ops = nn.Sequential(*ops)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented view of ``x`` (``N x 3 x H x W`` in [-1, 1])."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(x.shape)}")
        y = self.ops(((x.float() + 1.0) * 0.5).clamp(0.0, 1.0))
        return (y.clamp(0.0, 1.0) * 2.0 - 1.0).to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``(v1, v2)``, each ``N x 3 x out_h x out_w`` in [-1, 1]."""
        return self.view(x), self.view(x)


class ProjectionHead(nn.Module):
    """SimCLR projection head ``g``: Linear -> ReLU -> Linear (discarded after training)."""

    def __init__(self, in_dim: int = 512, hidden: int = 512, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent loss (SimCLR eq. 1) averaged over the 2N views.

    For view ``i`` with positive ``j`` (the other view of the same image):
    ``l(i, j) = -log( exp(sim(z_i, z_j)/T) / sum_{k != i} exp(sim(z_i, z_k)/T) )`` with cosine
    similarity ``sim``; the loss is the mean of ``l`` over all 2N views. Delegates to
    :class:`monai.losses.ContrastiveLoss`, which implements exactly this; inputs are cast to
    float32 and ``temperature`` must be >= :data:`MIN_TEMPERATURE` (MONAI exponentiates the
    similarities without a max-shift, so smaller temperatures overflow). Memory is
    O((2N)^2 * D) because MONAI broadcasts the cosine similarity.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected two N x D tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("NT-Xent needs at least 2 images per batch (negatives come from the batch)")
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE}, got {temperature}")
    return ContrastiveLoss(temperature=float(temperature))(z1.float(), z2.float())


def simclr_train_step(
    encoder: nn.Module,
    head: nn.Module,
    augment: nn.Module,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    temperature: float = 0.1,
) -> float:
    """One SimCLR step on ``images`` (``N x 3 x H x W`` in [-1, 1], N >= 2); returns the loss.

    Both views go through the encoder in one batch of 2N, then the head, then :func:`nt_xent_loss`.
    ``optimizer`` must hold the parameters of both ``encoder`` and ``head``.
    """
    encoder.train()
    head.train()
    v1, v2 = augment(images)
    z = head(encoder(torch.cat([v1, v2], dim=0)))
    z1, z2 = z.chunk(2, dim=0)
    loss = nt_xent_loss(z1, z2, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
