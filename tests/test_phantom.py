"""Tests for the embedded sample generator (diffusiondci.data.phantom)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import polygon as draw_polygon

from diffusiondci.data.phantom import generate_slide, mask_to_geojson, write_sample
from diffusiondci.errors import UserInputError

NAME_TO_LABEL = {"Benign": 1, "Malignant": 2}


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "sample"
    start = time.perf_counter()
    info = write_sample(out)
    return info, time.perf_counter() - start


def _read_image(path: Path) -> np.ndarray:
    if path.suffix == ".tif":
        return tifffile.imread(path)
    return np.asarray(Image.open(path))


def _rasterise(geometry: dict, shape: tuple[int, int]) -> np.ndarray:
    """Pixel-centre rasterisation of a GeoJSON (Multi)Polygon in QuPath pixel coordinates."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    out = np.zeros(shape, bool)
    for rings in polys:
        own = np.zeros(shape, bool)
        for k, ring in enumerate(rings):
            xy = np.asarray(ring, float)
            rr, cc = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
            own[rr, cc] = k == 0  # exterior fills, holes clear
        out |= own
    return out


def _block_features(img: np.ndarray, mask: np.ndarray, tissue: np.ndarray, b: int):
    """Mean colour and grey-level std of b x b blocks lying wholly inside one class (on tissue)."""
    feats, labels = [], []
    h, w = mask.shape
    for y in range(0, h - b + 1, b):
        for x in range(0, w - b + 1, b):
            m, t = mask[y : y + b, x : x + b], tissue[y : y + b, x : x + b]
            if not t.all() or (m != m[0, 0]).any():
                continue
            block = img[y : y + b, x : x + b].astype(float)
            feats.append([*block.reshape(-1, 3).mean(0), block.mean(-1).std()])
            labels.append(int(m[0, 0]))
    return np.asarray(feats), np.asarray(labels)


# --------------------------------------------------------------------------------------------------
# generate_slide


def test_slide_types_and_shapes():
    s = generate_slide(size=(200, 300), tile_size=64, seed=7)
    assert s.rgb.shape == s.clean_rgb.shape == (200, 300, 3)
    assert s.rgb.dtype == s.clean_rgb.dtype == s.mask.dtype == np.uint8
    assert s.mask.shape == s.tissue.shape == (200, 300) and s.tissue.dtype == bool
    assert set(np.unique(s.mask)) <= {0, 1, 2}
    assert s.casts.gain.shape == s.casts.offset.shape == (4, 5, 3)  # ceil(200/64) x ceil(300/64)
    if (s.mask > 0).any():
        assert s.tissue[s.mask > 0].mean() > 0.97  # lesions lie on tissue


def test_same_seed_same_bytes_other_seed_differs():
    a = generate_slide(size=(256, 256), seed=3)
    b = generate_slide(size=(256, 256), seed=3)
    c = generate_slide(size=(256, 256), seed=4)
    for name in ("rgb", "clean_rgb", "mask", "tissue"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.rgb.tobytes() != c.rgb.tobytes()
    assert a.mask.tobytes() != c.mask.tobytes()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_tissue_on_black_background(seed):
    s = generate_slide(size=(384, 384), seed=seed)
    assert 0.2 < s.tissue.mean() < 0.9
    for img in (s.rgb, s.clean_rgb):
        background = img[~s.tissue].mean()
        assert background < 10
        assert img[s.tissue].mean() > 2 * background + 10
    # the border of the slide is mostly black (one tissue piece, not a full frame)
    border = np.concatenate([s.tissue[0], s.tissue[-1], s.tissue[:, 0], s.tissue[:, -1]])
    assert border.mean() < 0.5


def _seam_ratio(img: np.ndarray, tissue: np.ndarray, tile: int) -> float:
    """Mean column-profile jump across vertical tile seams over the jump at mid-tile columns."""
    grey = img.astype(float)
    seam, mid = [], []
    for y0 in range(0, img.shape[0], tile):
        band, tb = grey[y0 : y0 + tile], tissue[y0 : y0 + tile]
        for x in range(tile, img.shape[1], tile):
            for target, col in ((seam, x), (mid, x - tile // 2)):
                both = tb[:, col] & tb[:, col - 1]
                if both.sum() < tile // 4:
                    continue
                jump = np.abs(band[both, col].mean(0) - band[both, col - 1].mean(0)).mean()
                target.append(jump)
    return float(np.mean(seam) / np.mean(mid))


def test_tile_casts_are_visible_and_scaled():
    slides = [generate_slide(size=(512, 512), tile_size=128, seed=k) for k in (5, 6, 7)]
    ratio_rgb = np.mean([_seam_ratio(s.rgb, s.tissue, 128) for s in slides])
    ratio_clean = np.mean([_seam_ratio(s.clean_rgb, s.tissue, 128) for s in slides])
    assert ratio_clean < 1.6  # no seams without casts: seam columns look like any other column
    assert ratio_rgb > 2.5 and ratio_rgb > 2.0 * ratio_clean
    s = slides[0]
    # per-tile mean colour (relative to the cast-free slide) varies from tile to tile
    rel = []
    for y in range(0, 512, 128):
        for x in range(0, 512, 128):
            win = (slice(y, y + 128), slice(x, x + 128))
            t = s.tissue[win]
            if t.mean() > 0.2:
                rel.append(s.rgb[win][t].mean(0) / s.clean_rgb[win][t].mean(0))
    assert np.std(rel, axis=0).mean() > 0.05
    flat = generate_slide(size=(256, 256), tile_size=128, seed=5, cast_strength=0.0)
    assert np.array_equal(flat.rgb, flat.clean_rgb)


def test_malignant_and_benign_look_different_enough_to_learn():
    train = generate_slide(seed=21)
    test = generate_slide(seed=22)
    xf, yf = _block_features(train.clean_rgb, train.mask, train.tissue, 32)
    xt, yt = _block_features(test.rgb, test.mask, test.tissue, 32)  # casts on the test slide
    for y in (yf, yt):
        assert {0, 1, 2} <= set(y.tolist())
    # malignant is warmer (red - blue) and brighter than benign
    warm = xf[:, 0] - xf[:, 2]
    assert warm[yf == 2].mean() > warm[yf == 1].mean() + 40
    assert xf[yf == 2, :3].mean() > xf[yf == 1, :3].mean()
    # a nearest-centroid classifier trained on one slide separates the classes on another
    mu, sd = xf.mean(0), xf.std(0) + 1e-6
    cent = np.stack([((xf[yf == k] - mu) / sd).mean(0) for k in (0, 1, 2)])
    pred = np.argmin(((((xt - mu) / sd)[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    for k in (1, 2):
        assert (pred[yt == k] == k).mean() > 0.8, k
    assert (pred == yt).mean() > 0.8


def test_bad_arguments_raise_user_errors(tmp_path):
    with pytest.raises(UserInputError):
        generate_slide(size=(32, 512))
    with pytest.raises(UserInputError):
        generate_slide(size=(128, 128), cast_strength=-1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserInputError):
        write_sample(a_file)
    with pytest.raises(UserInputError):
        write_sample(tmp_path / "s", n_slides=2, geojson_slides=(5,))


# --------------------------------------------------------------------------------------------------
# mask_to_geojson


def test_geojson_polygon_with_hole_and_island():
    mask = np.zeros((120, 140), np.uint8)
    yy, xx = np.mgrid[:120, :140]
    d = np.hypot(yy - 60, xx - 70)
    mask[(d < 50) & (d >= 25)] = 2       # malignant ring ...
    mask[d < 10] = 2                     # ... with an island in its hole
    mask[5:25, 5:30] = 1                 # a benign rectangle
    gj = json.loads(json.dumps(mask_to_geojson(mask)))
    assert gj["type"] == "FeatureCollection"
    by_name = {f["properties"]["classification"]["name"]: f["geometry"] for f in gj["features"]}
    assert set(by_name) == {"Benign", "Malignant"}
    mal = by_name["Malignant"]
    polys = [mal["coordinates"]] if mal["type"] == "Polygon" else mal["coordinates"]
    assert sorted(len(p) for p in polys) == [1, 2]  # the ring has one hole, the island none
    for name, label in NAME_TO_LABEL.items():
        got, want = _rasterise(by_name[name], mask.shape), mask == label
        iou = (got & want).sum() / (got | want).sum()
        assert iou > 0.97, (name, iou)
    # the rectangle's polygon bounds match its pixel corners (QuPath coordinates) to half a pixel
    ring = np.asarray(by_name["Benign"]["coordinates"][0])
    assert np.allclose([ring[:, 0].min(), ring[:, 0].max()], [5, 30], atol=0.5)
    assert np.allclose([ring[:, 1].min(), ring[:, 1].max()], [5, 25], atol=0.5)


# --------------------------------------------------------------------------------------------------
# write_sample


def test_write_sample_runtime(default_sample):
    _, seconds = default_sample
    assert seconds < 30  # a few seconds on a 2-core CPU; generous, as the suite may share the machine


def test_write_sample_layout(default_sample):
    info, _ = default_sample
    root = info.root
    assert (root / "README.txt").read_text().strip()
    assert len(info.stems) == 3
    suffixes = {info.slides[s].suffix for s in info.stems}
    assert suffixes == {".tif", ".png"}
    assert info.geojson and info.masks
    for stem in info.stems:
        slide = _read_image(info.slides[stem])
        assert slide.shape == (768, 768, 3) and slide.dtype == np.uint8
        clean = _read_image(root / "clean" / f"{stem}.png")
        assert clean.shape == slide.shape and not np.array_equal(clean, slide)
        beside = info.slides_dir / f"{stem}_mask.png"
        has_geojson = (info.slides_dir / f"{stem}.geojson").exists()
        assert beside.exists() != has_geojson  # a label image or a GeoJSON, never both
        truth = np.asarray(Image.open(root / "truth" / f"{stem}_mask.png"))
        if beside.exists():
            mask = np.asarray(Image.open(beside))
            assert mask.dtype == np.uint8 and mask.shape == (768, 768)
            assert set(np.unique(mask)) <= {0, 1, 2}
            assert np.array_equal(mask, truth)
        for label in (0, 1, 2):
            assert (truth == label).mean() > 0.03, (stem, label)
    tif = next(info.slides[s] for s in info.stems if info.slides[s].suffix == ".tif")
    with tifffile.TiffFile(tif) as tf:
        page = tf.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
    with open(info.groups_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == info.stems
    assert len({r["group"] for r in rows}) >= 2


def test_written_geojson_matches_truth(default_sample):
    info, _ = default_sample
    for stem, path in info.geojson.items():
        gj = json.loads(path.read_text())
        assert gj["type"] == "FeatureCollection"
        truth = np.asarray(Image.open(info.root / "truth" / f"{stem}_mask.png"))
        got = np.zeros(truth.shape, np.uint8)
        for feature in gj["features"]:
            assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
            got[_rasterise(feature["geometry"], truth.shape)] = NAME_TO_LABEL[
                feature["properties"]["classification"]["name"]]
        for label in (1, 2):
            want_area, got_area = (truth == label).sum(), (got == label).sum()
            assert want_area > 0
            assert abs(got_area - want_area) / want_area < 0.05, (stem, label)
            iou = ((got == label) & (truth == label)).sum() / ((got == label) | (truth == label)).sum()
            assert iou > 0.95, (stem, label, iou)


def test_write_sample_is_deterministic(tmp_path):
    kwargs = dict(n_slides=2, size=(192, 256), tile_size=64, geojson_slides=(0,))
    a = write_sample(tmp_path / "a", seed=1, **kwargs)
    b = write_sample(tmp_path / "b", seed=1, **kwargs)
    c = write_sample(tmp_path / "c", seed=2, **kwargs)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 8
    for rel in files_a:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    assert a.slides[a.stems[1]].read_bytes() != c.slides[c.stems[1]].read_bytes()
    assert not (tmp_path / "a.partial").exists()
    # rewriting over an existing sample replaces it cleanly
    again = write_sample(tmp_path / "a", seed=1, **kwargs)
    assert again.slides[a.stems[0]].read_bytes() == b.slides[b.stems[0]].read_bytes()
