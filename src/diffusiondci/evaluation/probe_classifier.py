"""Classifier training of the probe: the per-pixel MLP of ddpm-segmentation and its seeded fit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusiondci import NUM_CLASSES

from ..runs.seeds import derive_seed


class PixelClassifier(nn.Module):
    """Per-pixel MLP of ddpm-segmentation: ``(P, C) -> (P, num_classes)`` logits.

    ``Linear -> ReLU -> BatchNorm1d`` per hidden width, then ``Linear(num_classes)``. Inputs are
    first standardised with per-channel ``mean``/``std`` buffers (set by
    :func:`fit_pixel_classifier` from the training pixels), because raw decoder activations of
    different blocks differ in scale by orders of magnitude.
    """

    def __init__(self, in_channels: int, num_classes: int = NUM_CLASSES, hidden: Sequence[int] = (128, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        c = int(in_channels)
        for h in hidden:
            layers += [nn.Linear(c, int(h)), nn.ReLU(), nn.BatchNorm1d(int(h))]
            c = int(h)
        layers.append(nn.Linear(c, int(num_classes)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(int(in_channels)))
        self.register_buffer("std", torch.ones(int(in_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Labels ``(P,)`` (long, on the model's device), in eval mode, ``chunk`` pixels at a time."""
        was_training = self.training
        self.eval()
        dev = self.mean.device
        out = torch.cat([self(x[i:i + chunk].to(dev)).argmax(1) for i in range(0, x.shape[0], chunk)])
        self.train(was_training)
        return out


def _channel_stats(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``(P, C)`` without a full float32 copy."""
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].double()
        s += part.sum(0)
        s2 += part.square().sum(0)
    n = max(x.shape[0], 1)
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def fit_pixel_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    batch: int = 1024,
    hidden: Sequence[int] = (128, 32),
    num_classes: int = NUM_CLASSES,
    device: str | torch.device | None = None,
) -> PixelClassifier:
    """Train a :class:`PixelClassifier` on pixels ``features (P, C)`` with labels ``(P,)``.

    Adam, cross-entropy, ``steps`` mini-batches of ``batch`` pixels drawn uniformly with a seeded
    generator (same inputs + seed = same classifier on one device). ``features`` may be float16 and
    may stay on the CPU; ``device`` (default: the features' device) runs the training. Returns the
    classifier in eval mode.
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"need features (P, C) and labels (P,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if features.shape[0] < 2:
        raise ValueError("need at least 2 training pixels")
    dev = torch.device(device) if device is not None else features.device
    feats = features.to(dev)
    targets = labels.to(dev, torch.long)
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 0))
        model = PixelClassifier(features.shape[1], num_classes, hidden)
    model.mean, model.std = _channel_stats(feats)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(derive_seed(seed, 1))
    n = feats.shape[0]
    for _ in range(int(steps)):
        idx = torch.randint(n, (max(2, int(batch)),), generator=gen).to(dev)
        loss = F.cross_entropy(model(feats[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


__all__ = ["PixelClassifier", "fit_pixel_classifier"]
