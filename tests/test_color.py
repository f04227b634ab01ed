"""Tests for the modified Reinhard per-tile colour normalisation (data/color.py).

Synthetic slides are built in CIELAB with scikit-image (independent of the kornia conversion
used by the module); tile statistics for the checks are also measured with scikit-image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import lab2rgb, rgb2lab
from skimage.transform import downscale_local_mean

from diffusiondci.data import color
from diffusiondci.errors import UserInputError

SIZE, TILE = 1024, 256


class FakeSlide:
    """Array-backed stand-in for data/slides.py, recording the size of every read."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]
        self.reads: list[tuple[int, int, int, int]] = []

    def read_region(self, x, y, w, h):
        self.reads.append((x, y, w, h))
        return self.rgb[y : y + h, x : x + w].copy()


def _texture_lab(rng, h, w, base, amp):
    """Stationary textured tissue in LAB: smooth blobs + fine grain around ``base``."""
    lab = np.empty((h, w, 3))
    for c in range(3):
        smooth = gaussian_filter(rng.standard_normal((h, w)), 4)
        smooth /= smooth.std()
        lab[..., c] = base[c] + amp[c] * (0.8 * smooth + 0.6 * rng.standard_normal((h, w)))
    return lab


def _to_rgb(lab):
    return (np.clip(lab2rgb(lab), 0, 1) * 255).round().astype(np.uint8)


def _cast(lab, tissue, tile, rng, off=(6.0, 8.0, 8.0), scale=(0.8, 1.25)):
    """Per-tile random LAB offsets and scales on tissue pixels (about the tissue mean)."""
    out = lab.copy()
    m = lab[tissue].mean(axis=0)
    h, w = tissue.shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            sl = (slice(y, y + tile), slice(x, x + tile))
            s = rng.uniform(*scale, size=3)
            o = rng.uniform(-1, 1, size=3) * np.asarray(off)
            out[sl] = np.where(tissue[sl][..., None], (lab[sl] - m) * s + m + o, lab[sl])
    return out


def _tile_means(rgb, tissue, tile):
    """Per-tile tissue LAB means measured with scikit-image (tiles with tissue only)."""
    lab = rgb2lab(rgb)
    means = []
    for y in range(0, rgb.shape[0], tile):
        for x in range(0, rgb.shape[1], tile):
            t = tissue[y : y + tile, x : x + tile]
            if t.sum() > 500:
                means.append(lab[y : y + tile, x : x + tile][t].mean(axis=0))
    return np.array(means)


def _between_tile_var(means, ref_means):
    """Summed per-channel variance across tiles of the deviation from the clean tile means."""
    return float((means - ref_means).var(axis=0).sum())


@pytest.fixture(scope="module")
def dci():
    """1024 px DCI-like slide: colourful tissue on black, a black disk and a black tile."""
    rng = np.random.default_rng(0)
    lab = _texture_lab(rng, SIZE, SIZE, base=(55.0, 12.0, -22.0), amp=(7.0, 6.0, 6.0))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    background = (yy - 600) ** 2 + (xx - 380) ** 2 < 170**2
    background[:TILE, -TILE:] = True  # one tile with no tissue at all
    tissue = ~background
    clean = _to_rgb(lab)
    clean[background] = 0
    cast = _to_rgb(_cast(lab, tissue, TILE, rng))
    cast[background] = 0
    return clean, cast, tissue


@pytest.fixture(scope="module")
def dci_normalized(dci):
    _, cast, _ = dci
    slide = FakeSlide(cast)
    stats = color.compute_slide_tile_stats(slide, TILE, color.TissueConfig(), subsample=2)
    norm = color.TileNormalizer(stats, color.average_stats(stats.values()), TILE)
    return norm, norm.apply(cast, 0, 0), slide


def test_conversion_matches_skimage_and_round_trips():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    lab = color.rgb_to_lab(rgb)
    assert lab.dtype == np.float32 and lab.shape == rgb.shape
    np.testing.assert_allclose(lab, rgb2lab(rgb), atol=0.05)
    back = color.lab_to_rgb(lab)
    assert back.dtype == np.uint8 and np.abs(back.astype(int) - rgb).max() <= 1


def test_tissue_mask_black_and_white_backgrounds(dci):
    clean, _, tissue = dci
    assert (color.tissue_mask(clean) == tissue).mean() > 0.99
    rng = np.random.default_rng(2)
    he, he_tissue = _he_image(rng, 256)
    assert (color.tissue_mask(he) == he_tissue).mean() > 0.98
    assert not color.tissue_mask(np.zeros((8, 8, 3), np.uint8)).any()
    assert not color.tissue_mask(np.full((8, 8, 3), 240, np.uint8)).any()


def test_cast_between_tile_variance_removed(dci, dci_normalized):
    clean, cast, tissue = dci
    _, out, _ = dci_normalized
    ref = _tile_means(clean, tissue, TILE)
    injected = _between_tile_var(_tile_means(cast, tissue, TILE), ref)
    residual = _between_tile_var(_tile_means(out, tissue, TILE), ref)
    assert injected > 20  # the cast is substantial
    assert residual <= 0.1 * injected, (residual, injected)


def test_tile_contrast_equalised(dci, dci_normalized):
    clean, cast, tissue = dci
    _, out, _ = dci_normalized

    def tile_stds(rgb):
        lab = rgb2lab(rgb)
        return np.array([
            lab[y : y + TILE, x : x + TILE][tissue[y : y + TILE, x : x + TILE]].std(axis=0)
            for y in range(0, SIZE, TILE) for x in range(0, SIZE, TILE)
            if tissue[y : y + TILE, x : x + TILE].sum() > 500
        ])

    spread_cast = (tile_stds(cast) / tile_stds(clean)).std(axis=0).sum()
    spread_out = (tile_stds(out) / tile_stds(clean)).std(axis=0).sum()
    assert spread_out < 0.3 * spread_cast


def test_clean_slide_passes_nearly_unchanged(dci):
    clean, cast, tissue = dci
    out = color.normalize_image(clean, None, tile_size=TILE, subsample=2)
    diff = np.abs(out.astype(int) - clean.astype(int))[tissue]
    cast_diff = np.abs(cast.astype(int) - clean.astype(int))[tissue]
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6
    assert cast_diff.mean() > 5 * diff.mean()


def test_background_stays_background(dci, dci_normalized):
    _, cast, tissue = dci
    _, out, _ = dci_normalized
    assert (out[~tissue] == 0).all()
    assert (cast[~tissue] == 0).all()


def test_regions_across_tile_borders_match_whole(dci, dci_normalized):
    _, cast, _ = dci
    norm, whole, _ = dci_normalized
    for x0, y0, w, h in [(200, 130, 300, 400), (0, 0, 257, 255), (511, 767, 513, 257), (700, 5, 1, 900)]:
        part = norm.apply(cast[y0 : y0 + h, x0 : x0 + w], x0, y0)
        np.testing.assert_array_equal(part, whole[y0 : y0 + h, x0 : x0 + w])


def test_slide_stats_read_tile_by_tile_match_direct(dci):
    _, cast, _ = dci
    img = cast[:1000, :900]  # edge tiles are smaller
    slide = FakeSlide(img)
    calls = []
    stats, thumb = color.compute_slide_tile_stats(
        slide, TILE, subsample=3, progress=lambda d, t: calls.append((d, t)), thumbnail_factor=8
    )
    n_tiles = 4 * 4
    assert calls[-1] == (n_tiles, n_tiles) and len(calls) == n_tiles
    assert all(w <= TILE and h <= TILE for _, _, w, h in slide.reads)
    assert len(slide.reads) == n_tiles
    assert (0, 3) not in stats  # the all-background tile
    for (ty, tx), s in stats.items():
        tile = img[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
        direct = color.tile_stats(tile, subsample=3)
        np.testing.assert_allclose(s.mean, direct.mean)
        # independent check of the tissue-pixel statistics with scikit-image
        sub = tile[::3, ::3]
        lab = rgb2lab(sub)[color.tissue_mask(sub)]
        np.testing.assert_allclose(s.mean, lab.mean(axis=0), atol=0.05)
        np.testing.assert_allclose(s.std, lab.std(axis=0), atol=0.05)
    assert thumb.shape == (125, 113, 3)
    expected = downscale_local_mean(img[:1000, :896].astype(float), (8, 8, 1))
    assert np.abs(thumb[:, :112].astype(float) - expected).max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(color.slide_thumbnail(slide, 8, tile_size=300), thumb)


def test_average_stats_hand_computed():
    a = color.LabStats(np.array([10.0, 0.0, -4.0]), np.array([2.0, 1.0, 1.0]), 100)
    b = color.LabStats(np.array([20.0, 4.0, 0.0]), np.array([4.0, 3.0, 1.0]), 300)
    t = color.average_stats([a, b])
    np.testing.assert_allclose(t.mean, [17.5, 3.0, -1.0])
    np.testing.assert_allclose(t.std, [3.5, 2.5, 1.0])
    assert t.n == 400
    # the weighted mean of tile means is the pooled mean; the target std is below the pooled std
    rng = np.random.default_rng(3)
    p1, p2 = rng.normal(10, 2, (1000, 3)), rng.normal(20, 2, (3000, 3))
    s1 = color.LabStats(p1.mean(0), p1.std(0), len(p1))
    s2 = color.LabStats(p2.mean(0), p2.std(0), len(p2))
    t = color.average_stats([s1, s2])
    pooled = np.concatenate([p1, p2])
    np.testing.assert_allclose(t.mean, pooled.mean(0))
    assert (t.std < pooled.std(0) - 2).all()
    with pytest.raises(ValueError):
        color.average_stats([])


def _he_image(rng, size, tile=None):
    """H&E-like: pink/purple tissue blob on near-white glass (RGB ~ 240)."""
    lab = _texture_lab(rng, size, size, base=(62.0, 28.0, -12.0), amp=(7.0, 6.0, 5.0))
    yy, xx = np.mgrid[:size, :size]
    tissue = ((yy - size * 0.45) / (size * 0.38)) ** 2 + ((xx - size * 0.55) / (size * 0.42)) ** 2 < 1
    if tile is not None:
        lab = _cast(lab, tissue, tile, rng)
    rgb = _to_rgb(lab)
    glass = np.clip(240 + rng.normal(0, 2, (size, size, 3)), 0, 255).astype(np.uint8)
    rgb[~tissue] = glass[~tissue]
    return rgb, tissue


def test_white_background_he_image():
    rng = np.random.default_rng(4)
    cast, tissue = _he_image(rng, 512, tile=128)
    clean, _ = _he_image(np.random.default_rng(4), 512)
    out = color.normalize_image(cast, None, tile_size=128)
    np.testing.assert_array_equal(out[~tissue], cast[~tissue])  # white stays white
    ref = _tile_means(clean, tissue, 128)
    injected = _between_tile_var(_tile_means(cast, tissue, 128), ref)
    residual = _between_tile_var(_tile_means(out, tissue, 128), ref)
    assert injected > 20 and residual <= 0.1 * injected, (residual, injected)


def test_dataset_target_for_small_images():
    """GlaS-like collection: each image is one tile, the target is the dataset average."""
    images, cleans = [], []
    for i in range(6):
        rng = np.random.default_rng(10 + i)
        cast, tissue = _he_image(rng, 96, tile=96)
        images.append((cast, tissue))
    target = color.average_stats(color.tile_stats(img) for img, _ in images)
    before = np.array([rgb2lab(img)[t].mean(0) for img, t in images])
    after = np.array([rgb2lab(color.normalize_image(img, target))[t].mean(0) for img, t in images])
    assert after.var(0).sum() <= 0.1 * before.var(0).sum()
    np.testing.assert_allclose(after.mean(0), target.mean, atol=1.5)


def test_soft_background_transition_has_no_jumps():
    """Colours straddling the dark threshold get a continuous (not all-or-nothing) transfer."""
    L = np.linspace(2, 22, 161)
    lab = np.stack([L, np.full_like(L, 10.0), np.full_like(L, -15.0)], -1)[None]
    rgb = _to_rgb(lab)
    src = color.LabStats([40.0, 10.0, -15.0], [5.0, 5.0, 5.0], 1000)
    tgt = color.LabStats([60.0, 10.0, -15.0], [5.0, 5.0, 5.0], 1000)

    def max_jump(cfg):
        out = color.TileNormalizer({(0, 0): src}, tgt, 1000, cfg).apply(rgb, 0, 0).astype(int)
        change = np.abs(out - rgb.astype(int)).sum(-1)[0]
        return np.abs(np.diff(change)).max(), change

    soft, change = max_jump(color.TissueConfig())
    hard, _ = max_jump(color.TissueConfig(ramp=0))
    assert change[0] == 0 and change[-1] > 60  # black untouched, tissue fully shifted
    assert hard > 100 and soft < 0.15 * hard, (soft, hard)


def test_stats_json_round_trip_and_validation(dci_normalized):
    norm, _, _ = dci_normalized
    s = color.LabStats(np.array([50.5, -3.25, 7.0]), np.array([9.0, 4.0, 4.5]), 1234)
    back = color.LabStats.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_array_equal(back.mean, s.mean)
    np.testing.assert_array_equal(back.std, s.std)
    assert back.n == s.n
    with pytest.raises(UserInputError):
        color.LabStats.from_dict({"mean": [1, 2], "std": [1, 1, 1], "n": 3})
    with pytest.raises(UserInputError):
        color.LabStats.from_dict({"mean": [1, 2, 3], "n": 3}, path="dataset.json")

    rebuilt = color.TileNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    rng = np.random.default_rng(5)
    region = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rebuilt.apply(region, 100, 200), norm.apply(region, 100, 200))
    assert rebuilt.tile_stats.keys() == norm.tile_stats.keys()


def test_tile_stats_none_without_tissue():
    assert color.tile_stats(np.zeros((64, 64, 3), np.uint8)) is None
    assert color.tile_stats(np.full((64, 64, 3), 245, np.uint8)) is None
    img = np.zeros((64, 64, 3), np.uint8)
    img[:5, :5] = (200, 60, 90)  # 25 tissue pixels < min_pixels
    assert color.tile_stats(img) is None


def test_save_before_after(tmp_path, dci):
    clean, cast, _ = dci
    before, after = cast[::8, ::8].copy(), clean[::8, ::8].copy()
    path = color.save_before_after(before, after, tmp_path / "sub" / "cmp.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = before.shape[:2]
    assert img.shape[0] > h and img.shape[1] > 2 * w
    band = img.shape[0] - h
    np.testing.assert_array_equal(img[band:, :w], before)
    np.testing.assert_array_equal(img[band:, -w:], after)
    assert (img[:band] < 128).any()  # labels drawn
    with pytest.raises(ValueError):
        color.save_before_after(before, after[:-1], tmp_path / "x.png")


def test_numpy_lab_matches_kornia():
    """data/lab.py re-implements kornia's CIELAB in float32 numpy: same numbers to float32 rounding."""
    import torch
    from kornia.color import lab_to_rgb, rgb_to_lab

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    rgb[0, :256] = np.arange(256)[:, None]  # every grey level, black and white included
    ref = rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255).permute(1, 2, 0).numpy()
    lab = color.rgb_to_lab(rgb)
    assert np.abs(lab - ref).max() < 1e-3  # |a*|, |b*| ~ 100: a few float32 ulps
    shifted = lab * np.float32(1.1) + np.float32(3.0)  # out of gamut in places: clipped alike
    ref_rgb = lab_to_rgb(torch.from_numpy(shifted).permute(2, 0, 1), clip=True)
    ref_rgb = ref_rgb.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    diff = np.abs(color.lab_to_rgb(shifted).astype(int) - ref_rgb)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


def test_threads_do_not_change_statistics(dci):
    _, cast, _ = dci
    one = color.compute_slide_tile_stats(FakeSlide(cast), TILE, thumbnail_factor=8, workers=1)
    four = color.compute_slide_tile_stats(FakeSlide(cast), TILE, thumbnail_factor=8, workers=4)
    assert one[0].keys() == four[0].keys()
    for key, s in one[0].items():
        np.testing.assert_array_equal(s.mean, four[0][key].mean)
        np.testing.assert_array_equal(s.std, four[0][key].std)
    np.testing.assert_array_equal(one[1], four[1])
    norm = color.TileNormalizer(one[0], color.average_stats(one[0].values()), TILE)
    np.testing.assert_array_equal(norm.apply(cast, 5, 7), norm.apply(cast, 5, 7, workers=4))
