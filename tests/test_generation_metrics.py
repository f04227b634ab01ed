"""Generation metrics: FD against the closed form, KID against a naive loop, LPIPS-style by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diffusiondci.evaluation.generation_metrics as gm
from diffusiondci.errors import UserInputError
from diffusiondci.evaluation.generation_metrics import (
    INCEPTION_FILENAME,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    PrincipalProjection,
    diversity,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    lpips_style_distance,
    mmd2_unbiased,
    pairwise_lpips_style,
)

# ---------------------------------------------------------------- Fréchet distance


def test_fd_identical_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(x), x) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.5, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 1.0, 0.5])
    n = 40000
    a = mu1 + rng.normal(size=(n, 4)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(n, 4)) * np.sqrt(s2)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)
    # exact statistics give the exact value
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)


def test_fd_full_covariance_matches_monai():
    from monai.metrics.fid import get_fid_score

    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI passes scipy's deprecated `disp`
        ref = float(get_fid_score(torch.from_numpy(a), torch.from_numpy(b)))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_fd_near_singular_regularises_with_warning(monkeypatch):
    calls = []
    real_sqrtm = gm.scipy.linalg.sqrtm

    def fake_sqrtm(m):
        calls.append(m.copy())
        if len(calls) == 1:
            return np.full_like(m, np.nan)
        return real_sqrtm(m)

    monkeypatch.setattr(gm.scipy.linalg, "sqrtm", fake_sqrtm)
    eye = np.eye(2)
    with pytest.warns(RuntimeWarning, match="near-singular"):
        val = frechet_distance_from_stats(np.zeros(2), eye, np.zeros(2), 4 * eye, eps=0.01)
    np.testing.assert_allclose(calls[1], (1.01 * eye) @ (4.01 * eye))
    # exact FD of N(0, 1.01 I) and N(0, 4.01 I) in 2-D
    assert val == pytest.approx(2 * (1.01 + 4.01 - 2 * np.sqrt(1.01 * 4.01)), rel=1e-9)


def test_fd_fewer_samples_than_dims_is_finite():
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        val = frechet_distance(rng.normal(size=(5, 16)), rng.normal(size=(5, 16)) + 1.0)
    assert np.isfinite(val) and val > 0


def test_principal_projection_whitens_and_keeps_the_leading_axes():
    """Real data with known axes: the projection recovers them (up to sign), gives unit variance,
    and a mean shift along axis 1 of size d has projected FD d^2 / var_1 (closed form)."""
    rng = np.random.default_rng(4)
    std = np.array([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]  # orthonormal columns: the true axes
    real = (rng.normal(size=(20000, 6)) * std) @ basis.T + 7.0
    proj = PrincipalProjection(real, dims=2)
    assert proj.dims == 2
    for k in range(2):
        assert abs(proj.components[k] @ basis[:, k]) == pytest.approx(1.0, abs=1e-3)
    z = proj(real)
    assert z.shape == (20000, 2)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, atol=1e-6)
    # exact Gaussian statistics in the projected space: a shift of 2.5 along axis 1 (std 3)
    sample = (rng.normal(size=(20000, 6)) * std) @ basis.T + 7.0
    shifted = sample + 2.5 * basis[:, 1]
    value = frechet_distance(proj(shifted), proj(sample))
    assert value == pytest.approx((2.5 / 3.0) ** 2, rel=0.05)
    # a shift along a discarded axis is invisible; in the full space it is not
    hidden = sample + 2.5 * basis[:, 4]
    assert frechet_distance(proj(hidden), proj(sample)) < 0.01
    assert frechet_distance(hidden, sample) == pytest.approx(6.25, rel=0.05)


def test_principal_projection_is_stable_where_full_fd_is_not():
    """64 samples of 512-d features: two draws of one distribution stay near zero after the
    projection (the full FD of the same draws is in the thousands, all small-sample bias), and a
    set shifted by one standard deviation on every axis scores far above them."""
    rng = np.random.default_rng(5)
    scales = np.geomspace(10.0, 0.01, 512)
    real = rng.normal(size=(256, 512)) * scales
    proj = PrincipalProjection(real, dims=16)
    same = [frechet_distance(proj(rng.normal(size=(64, 512)) * scales), proj(rng.normal(size=(64, 512)) * scales))
            for _ in range(4)]
    shifted = frechet_distance(proj(rng.normal(size=(64, 512)) * scales + scales), proj(rng.normal(size=(64, 512)) * scales))
    assert max(same) < 3.0 < 8.0 < shifted
    with pytest.raises(ValueError, match="dims"):
        PrincipalProjection(real[:10], dims=10)
    with pytest.raises(ValueError, match="dimensions differ"):
        proj(np.zeros((3, 4)))


def test_fd_input_validation():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 2)), np.zeros((3, 2)))


# ---------------------------------------------------------------- KID


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_matches_naive_loop_and_torchmetrics():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(_naive_mmd2(x, y), rel=1e-10)
    assert mmd2_unbiased(x, y) == pytest.approx(float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y))), rel=1e-8)
    # one subset holding every row is a permutation of the whole set: same value, std 0
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=None)
    assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10) and std == 0.0


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and same_std > 0
    assert shifted > 0.5 and shifted > 10 * abs(same)
    assert kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=3) == kernel_inception_distance(
        a, b, subsets=5, subset_size=50, seed=3
    )
    with pytest.warns(UserWarning, match="subset_size"):
        kernel_inception_distance(a[:10], b[:20], subsets=2, subset_size=50)


# ---------------------------------------------------------------- feature extractors


class _StandInInception(nn.Module):
    """Same call signature as NVIDIA's TorchScript Inception; refuses anything but uint8 input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.linspace(-1.0, 1.0, 3 * 2048).reshape(3, 2048))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        feats = img.to(torch.float32).mean(dim=(2, 3)) @ self.proj
        if return_features:
            return feats
        return feats[:, :1008]


def _save_stand_in(folder) -> str:
    path = folder / INCEPTION_FILENAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_StandInInception()).save(str(path))
    return path


def test_inception_loader_with_torchscript_stand_in(tmp_path, monkeypatch):
    path = _save_stand_in(tmp_path)
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)  # numpy N x H x W x 3
    expected = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().mean((2, 3)) @ _StandInInception().proj

    ext = InceptionFeatureExtractor.from_file(path, batch_size=2)
    feats = ext(imgs)
    assert feats.shape == (5, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected)
    # float [-1, 1] input is mapped back to the same uint8 values
    unit = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(ext(unit), expected)
    torch.testing.assert_close(ext.extract([imgs[:3], imgs[3:]]), expected)
    # a folder holding the file, and the torch hub cache when no path is given
    torch.testing.assert_close(InceptionFeatureExtractor.from_file(tmp_path)(imgs), expected)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    _save_stand_in(tmp_path / "hub" / "checkpoints")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.testing.assert_close(InceptionFeatureExtractor.from_file()(imgs), expected)


def test_inception_missing_or_bad_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(UserInputError, match="offline") as info:
        InceptionFeatureExtractor.from_file()
    assert INCEPTION_FILENAME in str(info.value) and "empty_hub" in str(info.value)
    with pytest.raises(UserInputError, match="not found"):
        InceptionFeatureExtractor.from_file(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(UserInputError, match="TorchScript"):
        InceptionFeatureExtractor.from_file(bad)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3))


def test_module_feature_extractor():
    net = _small_net().train()
    seen = []

    def preprocess(x):
        seen.append((x.dtype, float(x.min()), float(x.max())))
        return x

    imgs = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    ext = ModuleFeatureExtractor(net, preprocess=preprocess, batch_size=2)
    feats = ext(imgs)
    assert feats.shape == (5, 6)
    assert net.training  # mode restored
    assert all(dt == torch.float32 and lo >= -1 and hi <= 1 for dt, lo, hi in seen)
    net.eval()
    with torch.no_grad():
        expected = net(imgs.float() / 127.5 - 1).mean(dim=(2, 3))
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(ModuleFeatureExtractor(net, batch_size=64)(imgs), expected)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ext(imgs.float())  # float images in [0, 255] are rejected
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- LPIPS-style distance and diversity


def _constant(vec, n=1, size=4) -> torch.Tensor:
    return torch.tensor(vec, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def _identity(x):
    return [x]


def test_lpips_style_by_hand():
    a = _constant([1.0, 0.0, 0.0])
    # unit vectors (1,0,0) vs (0,1,0): squared distance 2 at every pixel; vs (-1,0,0): 4
    assert float(lpips_style_distance(_identity, a, _constant([0.0, 1.0, 0.0]))) == pytest.approx(2.0, rel=1e-6)
    assert float(lpips_style_distance(_identity, a, _constant([-1.0, 0.0, 0.0]))) == pytest.approx(4.0, rel=1e-6)
    # scale invariance per pixel (channel normalisation) and summation over layers
    assert float(lpips_style_distance(_identity, a, _constant([0.5, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-6)
    two_layers = lambda x: [x, x[:, :, ::2, ::2]]  # noqa: E731
    assert float(lpips_style_distance(two_layers, a, _constant([0.0, 1.0, 0.0]))) == pytest.approx(4.0, rel=1e-6)


def test_lpips_style_properties_with_conv_net():
    net = _small_net().eval()

    def maps(x):
        h1 = net[2](net[1](net[0](x)))
        return [h1, net[3](h1)]

    g = torch.Generator().manual_seed(7)
    a = torch.rand(4, 3, 24, 24, generator=g) * 2 - 1
    small = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    big = (a + 0.8 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    d_same = lpips_style_distance(maps, a, a)
    assert d_same.shape == (4,) and torch.all(d_same.abs() < 1e-6)
    d_ab = lpips_style_distance(maps, a, big, batch_size=3)
    torch.testing.assert_close(d_ab, lpips_style_distance(maps, big, a))
    assert torch.all(lpips_style_distance(maps, a, small) < d_ab)
    # pairwise helper agrees with the paired distance
    samples = torch.stack([a[0], small[0], big[0]])
    pw = pairwise_lpips_style(maps, samples)
    ref = torch.stack(
        [lpips_style_distance(maps, samples[i : i + 1], samples[j : j + 1])[0] for i, j in [(0, 1), (0, 2), (1, 2)]]
    )
    torch.testing.assert_close(pw, ref, rtol=1e-5, atol=1e-6)


def test_diversity():
    same = _constant([0.2, -0.4, 0.9], n=10)
    assert diversity([same, same], _identity) == pytest.approx(0.0, abs=1e-6)
    # condition 1: three mutually orthogonal colours, every pair at distance 2; condition 2: identical
    cond1 = torch.cat([_constant([1.0, 0, 0]), _constant([0, 1.0, 0]), _constant([0, 0, 1.0])])
    cond2 = _constant([0, 1.0, 0], n=2)
    assert diversity([cond1, cond2], _identity) == pytest.approx((2.0 + 0.0) / 2, rel=1e-6)
    uint8 = ((cond1 + 1) * 127.5).round().to(torch.uint8)  # uint8 input works too (nonzero: mid-grey != 0)
    assert diversity([uint8], _identity) > 0
    with pytest.raises(ValueError, match="at least 2"):
        diversity([cond1[:1]], _identity)
