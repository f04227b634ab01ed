"""Generation metrics (paper §V-A3, Tables 1-3): FID, KID and LPIPS-style diversity.

* **FD / FID** (Heusel et al. 2017, the paper's ref. [49]): Fréchet distance between Gaussians
  fitted to two feature sets, ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. With
  :class:`InceptionFeatureExtractor` (2048-d pool features of the standard TF-ported InceptionV3)
  it is the usual FID; with :class:`ModuleFeatureExtractor` on our reference encoder it is a
  domain-specific FD that needs no download.
* **Projected FD** (:class:`PrincipalProjection`): FD after projecting both sets onto the top
  principal axes of a separate real set, whitened; well-posed with fewer samples than dimensions.
* **KID** (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (mean, std).
* **LPIPS-style distance** (Zhang et al. 2018, ref. [50]) without the learned linear weights:
  per layer, unit-normalise the feature vector of every pixel over channels, take the squared
  difference summed over channels, average over space, and sum over layers. The paper's
  diversity is the mean pairwise distance among the samples generated for one mask (10 per
  test mask), averaged over masks (:func:`diversity`).

Nothing here downloads anything.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from diffusiondci.errors import UserInputError

#: File name of NVIDIA's TorchScript port of the TF "inception-2015-12-05" graph
#: (StyleGAN2-ADA, clean-fid); it yields the standard 2048-d FID features.
INCEPTION_FILENAME = "inception-2015-12-05.pt"

FeatureMapsFn = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


# --------------------------------------------------------------------------------------------
# Fréchet distance and KID on feature arrays
# --------------------------------------------------------------------------------------------


def _as_features(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an N x D feature array, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of an ``N x D`` feature array (float64)."""
    f = _as_features(feats, "feats")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(
    mu_a: Any, sigma_a: Any, mu_b: Any, sigma_b: Any, eps: float = 1e-6
) -> float:
    """Fréchet distance between ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)``.

    ``Tr((S_a S_b)^(1/2))`` uses :func:`scipy.linalg.sqrtm`. If the product is near-singular
    (non-finite root, or an imaginary part that is not negligible) ``eps * I`` is added to both
    covariances (in every term, so the value is the exact distance of the regularised Gaussians)
    and a ``RuntimeWarning`` is issued; a negligible imaginary part is dropped.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu {mu_a.shape} / {mu_b.shape}, sigma {sigma_a.shape} / {sigma_b.shape}"
        )
    diff = mu_a - mu_b

    def _sqrt_trace(sa: np.ndarray, sb: np.ndarray) -> tuple[float, bool]:
        root = scipy.linalg.sqrtm(sa @ sb)
        if not np.isfinite(root).all():
            return math.nan, False
        if np.iscomplexobj(root):
            scale = max(1.0, float(np.abs(np.diagonal(root)).max()))
            if np.abs(np.diagonal(root).imag).max() > 1e-3 * scale:
                return float(np.trace(root).real), False
            root = root.real
        return float(np.trace(root)), True

    tr_covmean, ok = _sqrt_trace(sigma_a, sigma_b)
    if not ok:
        warnings.warn(
            f"Fréchet distance: covariance product is near-singular; adding {eps} to the diagonals "
            "(use more samples than feature dimensions for a reliable value)",
            RuntimeWarning,
            stacklevel=2,
        )
        sigma_a, sigma_b = sigma_a + np.eye(d) * eps, sigma_b + np.eye(d) * eps
        tr_covmean, ok = _sqrt_trace(sigma_a, sigma_b)
        if math.isnan(tr_covmean):
            raise ValueError("Fréchet distance: matrix square root is not finite even after regularisation")
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)
    return max(value, 0.0)  # >= 0 in exact arithmetic; clip rounding noise


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Fréchet distance (FID when the features are Inception pool features) of two ``N x D`` sets."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)


class PrincipalProjection:
    """The top ``dims`` principal axes of a real feature set, each scaled to unit variance.

    FD in the full feature space needs many more samples than dimensions: with 64 images and
    512-d encoder features the covariances have rank 63, the value is mostly small-sample bias
    and ``(S_a S_b)^(1/2)`` is ill-conditioned. Projecting both sets onto the leading axes of a
    *separate* real set (fitted once, e.g. on training patches) and whitening them keeps the
    distance well-posed at small n: use ``dims`` at most about n / 4. Projected FDs are
    comparable only under the same projection.
    """

    def __init__(self, real: Any, dims: int) -> None:
        x = _as_features(real, "real")
        if not 1 <= int(dims) < x.shape[0]:
            raise ValueError(f"dims must lie in [1, {x.shape[0] - 1}] for {x.shape[0]} real samples, got {dims}")
        self.mean = x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        scale = sv[: int(dims)] / math.sqrt(x.shape[0] - 1)
        if scale[-1] <= 1e-12 * max(scale[0], 1e-300):
            raise ValueError(f"the real set spans fewer than {dims} dimensions")
        self.components = vt[: int(dims)]
        self.scale = scale

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    def __call__(self, feats: Any) -> np.ndarray:
        x = _as_features(feats, "feats")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {self.mean.shape[0]}")
        return (x - self.mean) @ self.components.T / self.scale


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Any, y: Any) -> float:
    """Unbiased MMD^2 between two ``m x D`` / ``n x D`` sets with the cubic polynomial kernel."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    term_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * k_xy.mean())


def kernel_inception_distance(
    feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int | None = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID of two feature sets: ``(mean, std)`` of unbiased MMD^2 over ``subsets`` random subsets.

    Each subset draws ``subset_size`` rows of each set without replacement (Bińkowski et al.
    2018; torchmetrics' ``KernelInceptionDistance`` does the same). ``subset_size=None`` or a
    value larger than the smaller set uses the whole smaller set (warning only in the latter case).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if int(subsets) < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    limit = min(a.shape[0], b.shape[0])
    if subset_size is None:
        size = limit
    else:
        size = int(subset_size)
        if size < 2:
            raise ValueError(f"subset_size must be >= 2, got {subset_size}")
        if size > limit:
            warnings.warn(f"KID: subset_size {size} > smallest set ({limit}); using {limit}", stacklevel=2)
            size = limit
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets))
    for s in range(int(subsets)):
        ia = rng.choice(a.shape[0], size, replace=False)
        ib = rng.choice(b.shape[0], size, replace=False)
        values[s] = mmd2_unbiased(a[ia], b[ib])
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------------------------


def _to_nchw_tensor(images: Any) -> torch.Tensor:
    """Batch of images to an ``N x 3 x H x W`` tensor, dtype kept (numpy ``N x H x W x 3`` allowed)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor of images, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected N x 3 x H x W (or N x H x W x 3 uint8) images, got shape {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"expected 3-channel RGB images, got shape {tuple(images.shape)}")
    return images


def images_to_unit(images: Any) -> torch.Tensor:
    """uint8 ``[0, 255]`` or float ``[-1, 1]`` images -> float32 ``N x 3 x H x W`` in ``[-1, 1]``."""
    x = _to_nchw_tensor(images)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    x = x.float()
    if x.numel() and (x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3):
        raise ValueError(
            f"float images must lie in [-1, 1], got range [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )
    return x.clamp(-1.0, 1.0)


def images_to_uint8(images: Any) -> torch.Tensor:
    """uint8 or float ``[-1, 1]`` images -> uint8 ``N x 3 x H x W`` (rounded)."""
    x = _to_nchw_tensor(images)
    if x.dtype == torch.uint8:
        return x.contiguous()
    return ((images_to_unit(x) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


class _BatchedExtractor(abc.ABC):
    """Shared batching: ``extractor(images)`` and ``extractor.extract(batches)`` -> ``N x D`` float32 CPU."""

    batch_size: int = 64

    @abc.abstractmethod
    def _features(self, batch: Any) -> torch.Tensor:
        """Features of one batch (N x 3 x H x W tensor) as N x D."""

    def __call__(self, images: Any) -> torch.Tensor:
        x = _to_nchw_tensor(images)
        outs = [self._features(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        if not outs:
            raise ValueError("no images given")
        return torch.cat(outs)

    def extract(self, batches: Iterable[Any]) -> torch.Tensor:
        """Features of an iterable of image batches (e.g. a DataLoader), concatenated."""
        outs = [self(b) for b in batches]
        if not outs:
            raise ValueError("no image batches given")
        return torch.cat(outs)

    @staticmethod
    def _flatten(feats: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feature network returned {type(feats).__name__}, expected a tensor")
        if feats.ndim > 2:  # N x C x H x W maps -> global average pooling
            feats = feats.flatten(2).mean(-1) if feats.ndim > 3 else feats.reshape(feats.shape[0], -1)
        feats = feats.reshape(n, -1)
        return feats.detach().float().cpu()


class InceptionFeatureExtractor(_BatchedExtractor):
    """2048-d InceptionV3 pool features from NVIDIA's TorchScript ``inception-2015-12-05.pt``.

    Calling convention of that file (StyleGAN2-ADA ``metrics/frechet_inception_distance.py``):
    ``model(images, return_features=True)`` with ``images`` an ``N x 3 x H x W`` uint8 tensor in
    ``[0, 255]`` of any size; the scripted graph itself resizes to 299 x 299 (bilinear) and maps to
    the network's input range. Images are passed at their own size, as StyleGAN2-ADA does (clean-fid
    instead resizes to 299 with PIL bicubic first, so its values differ slightly).

    The file runs TorchScript code: only load files from a source you trust.
    """

    def __init__(self, model: torch.jit.ScriptModule | nn.Module, batch_size: int = 64, device: Any = None):
        self.model = model.eval()
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else _module_device(model)

    @staticmethod
    def default_path() -> Path:
        """Where the file is looked for when no path is given: ``torch.hub.get_dir()/checkpoints/``."""
        return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME

    @classmethod
    def from_file(
        cls, path: str | Path | None = None, batch_size: int = 64, device: Any = "cpu"
    ) -> InceptionFeatureExtractor:
        """Load the TorchScript file from ``path`` (a file, or a folder holding it) or the torch cache.

        Never downloads. Raises :class:`UserInputError` when the file is missing or not loadable.
        """
        p = cls.default_path() if path is None else Path(path)
        if p.is_dir():
            p = p / INCEPTION_FILENAME
        if not p.is_file():
            raise UserInputError(
                f"Inception weights not found; nothing is downloaded: place NVIDIA's {INCEPTION_FILENAME} "
                f"(StyleGAN2-ADA / clean-fid) at this path or in {cls.default_path().parent}, "
                "or compute the Fréchet distance on reference-encoder features, which works offline",
                p,
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 flags TorchScript
                model = torch.jit.load(str(p), map_location=device)
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserInputError(
                f"not a loadable TorchScript Inception file ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                f"use NVIDIA's {INCEPTION_FILENAME}",
                p,
            ) from exc
        return cls(model, batch_size=batch_size, device=device)

    @torch.no_grad()
    def _features(self, batch: Any) -> torch.Tensor:
        x = images_to_uint8(batch).to(self.device)
        feats = self.model(x, return_features=True)
        return self._flatten(feats, x.shape[0])


class ModuleFeatureExtractor(_BatchedExtractor):
    """Features from any ``nn.Module`` (e.g. the reference encoder) for FD / KID.

    Images (uint8 or float ``[-1, 1]``) are converted to float ``[-1, 1]`` ``N x 3 x H x W``, passed
    through ``preprocess`` (optional tensor -> tensor callable, e.g. a resize) and the module; a
    spatial output ``N x C x H x W`` is global-average-pooled. The module runs in eval mode under
    ``no_grad`` and its training flag is restored afterwards.
    """

    def __init__(
        self,
        module: nn.Module,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 64,
    ):
        self.module = module
        self.preprocess = preprocess
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def _features(self, batch: Any) -> torch.Tensor:
        x = images_to_unit(batch).to(_module_device(self.module))
        if self.preprocess is not None:
            x = self.preprocess(x)
        was_training = self.module.training
        self.module.eval()
        try:
            feats = self.module(x)
        finally:
            self.module.train(was_training)
        return self._flatten(feats, x.shape[0])


# --------------------------------------------------------------------------------------------
# LPIPS-style distance and diversity
# --------------------------------------------------------------------------------------------


def _normalized_maps(feature_maps_fn: FeatureMapsFn, images: Any, eps: float) -> list[torch.Tensor]:
    x = images_to_unit(images)
    maps = feature_maps_fn(x)
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    maps = list(maps)
    if not maps:
        raise ValueError("feature_maps_fn returned no feature maps")
    out = []
    for f in maps:
        if f.ndim != 4 or f.shape[0] != x.shape[0]:
            raise ValueError(f"feature maps must be N x C x H x W with N={x.shape[0]}, got {tuple(f.shape)}")
        f = f.detach().float()
        out.append(f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps))
    return out


def _maps_distance(maps_a: list[torch.Tensor], maps_b: list[torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for fa, fb in zip(maps_a, maps_b):
        total = total + (fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total


@torch.no_grad()
def lpips_style_distance(
    feature_maps_fn: FeatureMapsFn, imgs_a: Any, imgs_b: Any, eps: float = 1e-10, batch_size: int = 32
) -> torch.Tensor:
    """LPIPS formula without learned weights between paired images: tensor ``[N]`` (CPU, float32).

    ``d(a, b) = sum_l mean_{h,w} || f_l(a)_{hw} / |f_l(a)_{hw}| - f_l(b)_{hw} / |f_l(b)_{hw}| ||^2``,
    where ``f_l`` are the maps ``feature_maps_fn`` returns (a tensor or a list of ``N x C x H x W``)
    and the norm is over channels. With all linear weights equal to 1 this is the ``lpips=False``
    baseline of Zhang et al. (2018). Images are uint8 or float ``[-1, 1]``; ``imgs_a`` and
    ``imgs_b`` must have the same shape.
    """
    a, b = _to_nchw_tensor(imgs_a), _to_nchw_tensor(imgs_b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    out = []
    for i in range(0, a.shape[0], batch_size):
        ma = _normalized_maps(feature_maps_fn, a[i : i + batch_size], eps)
        mb = _normalized_maps(feature_maps_fn, b[i : i + batch_size], eps)
        if len(ma) != len(mb):
            raise ValueError("feature_maps_fn returned a different number of layers for the two batches")
        out.append(_maps_distance(ma, mb).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pairwise_lpips_style(feature_maps_fn: FeatureMapsFn, samples: Any, eps: float = 1e-10) -> torch.Tensor:
    """Distances of all ``K (K - 1) / 2`` unordered pairs among ``K`` samples (features computed once)."""
    x = _to_nchw_tensor(samples)
    k = x.shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 samples per condition, got {k}")
    maps = _normalized_maps(feature_maps_fn, x, eps)
    pairs = list(combinations(range(k), 2))
    ia = torch.tensor([p[0] for p in pairs])
    ib = torch.tensor([p[1] for p in pairs])
    return _maps_distance([m[ia] for m in maps], [m[ib] for m in maps]).cpu()


def diversity(samples_per_condition: Sequence[Any], feature_maps_fn: FeatureMapsFn, eps: float = 1e-10) -> float:
    """The paper's LPIPS diversity: mean pairwise LPIPS-style distance among the ``K`` samples of
    each condition (``K x 3 x H x W``; 10 samples per test mask in the paper), averaged over conditions.
    """
    if len(samples_per_condition) == 0:
        raise ValueError("no conditions given")
    means = [float(pairwise_lpips_style(feature_maps_fn, s, eps).mean()) for s in samples_per_condition]
    return float(np.mean(means))
