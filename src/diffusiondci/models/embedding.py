"""Embedding many images with a reference encoder: batched, eval mode, no grad, float32 on the CPU."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def _as_tensor_image(item: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A ``uint8 H x W x 3`` array or a float ``3 x H x W`` tensor in [-1, 1] -> float ``3 x H x W``."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"numpy images must be uint8 H x W x 3, got {item.dtype} {item.shape}")
        return torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1).float() / 127.5 - 1.0
    if isinstance(item, torch.Tensor) and item.ndim == 3 and item.shape[0] == 3 and item.is_floating_point():
        return item
    raise ValueError(f"expected a uint8 H x W x 3 array or a float 3 x H x W tensor, got {type(item).__name__}")


@torch.no_grad()
def embed_dataset(
    encoder: nn.Module,
    images_iterable: Iterable[np.ndarray | torch.Tensor],
    batch_size: int = 32,
) -> torch.Tensor:
    """Embed every image (eval mode, no grad) for the embedding cache: returns float32 ``N x D`` on CPU.

    Items are single images, either ``uint8 H x W x 3`` arrays or float ``3 x H x W`` tensors in
    [-1, 1] (iterating over an ``N x 3 x H x W`` tensor works). Images are batched ``batch_size``
    at a time; a batch is flushed early when the image size changes. The encoder's training mode
    is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            out.append(encoder(torch.stack(batch).to(device)).float().cpu())
            batch.clear()

    try:
        for item in images_iterable:
            img = _as_tensor_image(item)
            if batch and img.shape != batch[0].shape:
                flush()
            batch.append(img)
            if len(batch) == batch_size:
                flush()
        flush()
    finally:
        encoder.train(was_training)
    if not out:
        raise ValueError("embed_dataset got no images")
    return torch.cat(out, dim=0)
