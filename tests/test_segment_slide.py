"""Whole-slide inference (``diffusiondci segment``) with fake model runs: stitching, geometry,
outputs, colour normalisation as in ``prepare``, errors and the CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from diffusiondci.data import color
from diffusiondci.data.annotations import load_geojson
from diffusiondci.data.imageio import read_mask, read_rgb
from diffusiondci.data.patch_dataset import to_tensor_image
from diffusiondci.data.phantom import generate_slide
from diffusiondci.data.slides import open_slide
from diffusiondci.errors import UserInputError
from diffusiondci.inference import slide as slide_mod
from diffusiondci.inference.slide import find_images, segment_paths, segment_slide


class FakeRun:
    """A model run whose network is a rule: ``constant`` label everywhere, or a colour rule."""

    def __init__(self, patch_size=32, roi_size=None, color_norm=None, constant=None, smooth=1):
        self.run_dir = Path("fake_run")
        self.patch_size, self.roi_size, self.color_norm = patch_size, roi_size, color_norm
        self.num_classes = 3
        self.constant, self.smooth = constant, smooth
        self.calls = 0

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        n, _, h, w = images.shape
        if self.constant is not None:
            logits = torch.zeros(n, 3, h, w)
            logits[:, self.constant] = 1.0
            return logits
        return colour_rule(images, self.smooth)


def colour_rule(images: torch.Tensor, smooth: int = 1) -> torch.Tensor:
    """Dark -> background, greener -> benign, redder -> malignant (tie-free offsets)."""
    v = (images + 1) / 2
    if smooth > 1:
        v = F.avg_pool2d(v, smooth, 1, smooth // 2, count_include_pad=False)
    r, g = v[:, 0], v[:, 1]
    brightness = v.max(dim=1).values
    return torch.stack([10 * (0.25 - brightness) + 0.013, 10 * (g - r) + 0.031, 10 * (r - g)], dim=1)


def _write(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def _blocks(h: int, w: int) -> np.ndarray:
    """Black image with a red rectangle and a green disc (and some noise)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 20, (h, w, 3)).astype(np.uint8)
    img[h // 6 : h // 2, w // 8 : w // 2] = (200, 40, 30)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 5) ** 2] = (30, 190, 60)
    return img


@pytest.mark.parametrize("roi_size, downsample", [(None, 1), (64, 1), (48, 3)])
def test_constant_model_is_stitched_exactly(tmp_path, roi_size, downsample):
    path = _write(tmp_path / "odd.png", np.random.default_rng(1).integers(0, 255, (301, 257, 3), np.uint8))
    run = FakeRun(roi_size=roi_size, constant=2)
    out = segment_slide(run, path, tmp_path / "out", overlap=0.3, batch_size=5, label_downsample=downsample,
                        progress=False)
    labels = read_mask(out["labels"])
    assert labels.shape == (-(-301 // downsample), -(-257 // downsample))
    assert (labels == 2).all()
    areas = json.loads(out["areas"].read_text())
    assert areas["classes"]["malignant"]["fraction_of_slide"] == pytest.approx(1.0)
    assert areas["classes"]["malignant"]["area_px2"] == pytest.approx(301 * 257)


def test_outputs_geometry_and_geojson_round_trip(tmp_path):
    h, w = 300, 260
    path = _write(tmp_path / "blocks.png", _blocks(h, w))
    run = FakeRun(patch_size=32, roi_size=48)  # 1.5 slide px per model px
    out = segment_slide(run, path, tmp_path / "out", progress=False)
    assert {p.name for p in out.values()} == {
        "blocks_labels.png", "blocks_overlay.png", "blocks.geojson", "blocks_areas.json"}
    labels = read_mask(out["labels"])
    assert labels.shape == (h, w)
    assert labels[h // 3, w // 3] == 2 and labels[2 * h // 3, 2 * w // 3] == 1 and labels[5, 5] == 0
    # labels are the model-scale labels upsampled by 1.5 (pixel centres): constant on each block
    truth = np.zeros((h, w), np.uint8)
    truth[h // 6 : h // 2, w // 8 : w // 2] = 2
    assert (labels == truth)[h // 6 + 2 : h // 2 - 2, w // 8 + 2 : w // 2 - 2].all()
    assert read_rgb(out["overlay"]).shape == (h, w, 3)

    # the polygons trace the model-scale labels: exact at that scale (inside the slide) ...
    geo = load_geojson(out["geojson"])
    centres = lambda n: ((np.arange(n) + 0.5) * 1.5).astype(int)  # noqa: E731
    model = labels[np.ix_(centres(200), centres(172))]
    np.testing.assert_array_equal(geo.rasterize(0, 0, 172 * 1.5, 200 * 1.5, 200, 172), model)
    # ... and nearly so at the slide's (corners of the pixel staircase are cut diagonally)
    raster = geo.rasterize(0, 0, w, h, h, w)
    assert np.mean(raster != labels) < 0.01
    for feature in json.loads(out["geojson"].read_text())["features"]:
        xs, ys = np.array(_coords(feature["geometry"])).T
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= w and ys.max() <= h

    areas = json.loads(out["areas"].read_text())
    fractions = [c["fraction_of_slide"] for c in areas["classes"].values()]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    counts = np.bincount(labels.ravel(), minlength=3) / labels.size
    assert fractions == pytest.approx(counts.tolist(), abs=0.01)
    assert areas["height"] == h and areas["width"] == w
    assert areas["settings"]["slide_px_per_model_px"] == 1.5
    assert 0 < areas["tissue_fraction"] < 1
    tissue_fractions = [c["fraction_of_tissue"] for c in areas["classes"].values()]
    assert sum(tissue_fractions) == pytest.approx(1.0, abs=1e-5)
    assert areas["classes"]["malignant"]["fraction_of_tissue"] > fractions[2]


def _coords(geometry: dict) -> list:
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [pt for poly in polys for ring in poly for pt in ring]


def test_banded_inference_of_a_2048_slide_equals_the_pixel_rule(tmp_path, monkeypatch):
    """Bands + margins + Gaussian blending of a pixel-wise model give exactly its per-pixel answer."""
    rng = np.random.default_rng(2)
    coarse = rng.integers(0, 255, (32, 32, 3), np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((2048, 2048), Image.Resampling.BILINEAR))
    path = tmp_path / "big.tif"
    import tifffile

    tifffile.imwrite(path, big, photometric="rgb", tile=(256, 256))
    monkeypatch.setattr(slide_mod, "BAND_BYTES", 512 * 64 * 4 * 10 * 3)  # ~3 bands of 64 rows at 512 px
    monkeypatch.setattr(slide_mod, "CHUNK_SLIDE_PX", 512)
    run = FakeRun(patch_size=32, roi_size=128)  # model-scale image 512 x 512
    out = segment_slide(run, path, tmp_path / "out", batch_size=16, label_downsample=4, progress=False)
    model_scale = np.array(Image.fromarray(big).resize((512, 512), Image.Resampling.BOX))
    expected = colour_rule(to_tensor_image(model_scale)[None])[0].argmax(0).numpy()
    labels = read_mask(out["labels"])  # label_downsample 4 = exactly the model scale here
    assert labels.shape == (512, 512)
    np.testing.assert_array_equal(labels, expected)
    assert len(set(np.unique(expected))) == 3
    assert slide_mod._bands(512, 512, 32, 3)[0] < 512  # really banded


def test_model_input_equals_prepare_patches(tmp_path):
    """The model-scale image is exactly the patches ``prepare`` made (normalised the same way)."""
    from diffusiondci.data.prepare import PrepareConfig, prepare_dataset

    s = generate_slide((256, 256), tile_size=64, seed=4)
    slides = tmp_path / "slides"
    slides.mkdir()
    _write(slides / "p.png", s.rgb)
    Image.fromarray(s.mask).save(slides / "p_mask.png")
    cfg = PrepareConfig(roi_size=64, stride=64, patch_size=32, tile_size=64, min_tissue=0.0,
                        val_fraction=0.0, test_fraction=0.0)
    data = prepare_dataset(slides, tmp_path / "data", cfg, log=lambda _: None)
    record = json.loads((data / "dataset.json").read_text())["color_norm"]
    run = FakeRun(patch_size=32, roi_size=64, color_norm=record)
    scale = slide_mod._Scale(run.roi_size, run.patch_size)
    with open_slide(slides / "p.png") as sl:
        normalizer, tissue_cfg, _, info = slide_mod._normalizer(sl, record, True, tmp_path)
        image, _ = slide_mod._model_image(sl, scale, normalizer, tissue_cfg, _NoBar())
    assert info["enabled"] and normalizer is not None
    patches = sorted((data / "images").glob("*.png"))
    assert len(patches) >= 8
    for p in patches:
        x, y = (int(v[1:]) for v in p.stem.split("_")[-2:])
        np.testing.assert_array_equal(image[y // 2 : y // 2 + 32, x // 2 : x // 2 + 32], read_rgb(p))


class _NoBar:
    def update(self, n: int) -> None:
        pass


@pytest.fixture(scope="module")
def cast_and_clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("phantom")
    s = generate_slide((512, 512), tile_size=128, seed=5)
    tiles = color.compute_slide_tile_stats(_ArraySlide(s.clean_rgb), 128)
    record = {"enabled": True, "target_mode": "dataset", "tile_size": 128,
              "tissue": dataclasses.asdict(color.TissueConfig()),
              "target": color.average_stats(tiles.values()).to_dict(), "slide_targets": {}}
    return _write(base / "cast.png", s.rgb), _write(base / "clean.png", s.clean_rgb), s.tissue, record


class _ArraySlide:
    def __init__(self, rgb):
        self.rgb, self.height, self.width = rgb, rgb.shape[0], rgb.shape[1]

    def read_region(self, x, y, w, h):
        return self.rgb[y : y + h, x : x + w]


def test_color_normalisation_removes_tile_casts(tmp_path, cast_and_clean):
    cast, clean, tissue, record = cast_and_clean
    run = FakeRun(patch_size=32, roi_size=64, color_norm=record, smooth=9)
    labels = {}
    for name, path in (("cast", cast), ("clean", clean)):
        for norm in (True, False):
            out = segment_slide(run, path, tmp_path / f"{name}_{norm}", color_norm=norm, progress=False)
            labels[name, norm] = read_mask(out["labels"])
            info = json.loads(out["areas"].read_text())["settings"]["color_norm"]
            assert info["enabled"] is norm
    disagree = {norm: np.mean((labels["cast", norm] != labels["clean", norm])[tissue]) for norm in (True, False)}
    assert disagree[True] < 0.12
    assert disagree[False] > 1.5 * disagree[True]


def test_slide_target_mode_uses_the_slides_own_average(tmp_path, cast_and_clean):
    cast, _, _, record = cast_and_clean
    record = {**record, "target_mode": "slide", "target": None}
    out = segment_slide(FakeRun(roi_size=64, color_norm=record), cast, tmp_path, progress=False)
    info = json.loads(out["areas"].read_text())["settings"]["color_norm"]
    with open_slide(cast) as sl:
        tiles = color.compute_slide_tile_stats(sl, 128)
    assert info["target"]["mean"] == pytest.approx(color.average_stats(tiles.values()).mean.tolist())


def test_bad_settings_and_inputs_raise_user_errors(tmp_path):
    good = _write(tmp_path / "ok.png", _blocks(64, 64))
    run = FakeRun()
    for kw in ({"window": 0}, {"overlap": 1.0}, {"overlap": -0.1}, {"batch_size": 0},
               {"label_downsample": 0}):
        with pytest.raises(UserInputError):
            segment_slide(run, good, tmp_path / "out", progress=False, **kw)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserInputError, match="broken.png"):
        segment_slide(run, broken, tmp_path / "out", progress=False)
    with pytest.raises(UserInputError, match="max-pixels"):
        segment_slide(run, good, tmp_path / "out", progress=False, max_pixels=100)
    with pytest.raises(UserInputError, match="no such file"):
        find_images([tmp_path / "missing.png"])
    (tmp_path / "ok.tif").write_bytes(b"")
    with pytest.raises(UserInputError, match="stem 'ok'"):
        find_images([tmp_path])


def test_segment_paths_skips_masks_and_outputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.png", _blocks(80, 70))
    _write(folder / "b.png", _blocks(70, 90))
    Image.fromarray(np.zeros((80, 70), np.uint8)).save(folder / "a_mask.png")
    _write(folder / "a_overlay.png", _blocks(8, 8))
    results = segment_paths(FakeRun(), [folder], tmp_path / "out", progress=False)
    assert sorted(results) == ["a", "b"]
    assert read_mask(results["b"]["labels"]).shape == (70, 90)


def test_segment_paths_skips_finished_slides(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.png", _blocks(80, 70))
    _write(folder / "b.png", _blocks(70, 90))
    run = FakeRun()
    segment_paths(run, [folder], tmp_path / "out", progress=False)
    calls, stamp = run.calls, (tmp_path / "out" / "a_labels.png").stat().st_mtime_ns
    (tmp_path / "out" / "b_overlay.png").unlink()  # an incomplete slide is redone
    results = segment_paths(run, [folder], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "a_labels.png").stat().st_mtime_ns == stamp and results["a"]["labels"].is_file()
    assert (tmp_path / "out" / "b_overlay.png").is_file() and run.calls > calls
    calls = run.calls
    segment_paths(run, [folder / "a.png"], tmp_path / "out", overlap=0.5, progress=False)  # other settings
    assert run.calls > calls
    calls = run.calls
    segment_paths(run, [folder / "a.png"], tmp_path / "out", overlap=0.5, progress=False)
    assert run.calls == calls
    segment_paths(run, [folder / "a.png"], tmp_path / "out", overlap=0.5, progress=False, overwrite=True)
    assert run.calls > calls


def test_cli_segment(tmp_path, monkeypatch):
    from diffusiondci.cli import app

    path = _write(tmp_path / "s.png", _blocks(100, 120))
    loaded = {}

    def load_segmenter(run_dir, checkpoint="best", device=None, tta=None):
        loaded.update(run_dir=run_dir, checkpoint=checkpoint, device=device, tta=tta)
        return FakeRun(roi_size=64)

    monkeypatch.setitem(sys.modules, "diffusiondci.segmentation.run",
                        types.SimpleNamespace(load_segmenter=load_segmenter))
    result = CliRunner().invoke(app, ["segment", str(path), "--model", str(tmp_path / "run"),
                                      "--out", str(tmp_path / "out"), "--overlap", "0.5",
                                      "--label-downsample", "2", "--checkpoint", "latest", "--tta", "flip"])
    assert result.exit_code == 0, result.output
    assert loaded["checkpoint"] == "latest" and loaded["tta"] == "flip"
    assert read_mask(tmp_path / "out" / "s_labels.png").shape == (50, 60)
    settings = json.loads((tmp_path / "out" / "s_areas.json").read_text())["settings"]
    assert settings["overlap"] == 0.5
    bad = CliRunner().invoke(app, ["segment", str(path), "--model", "x", "--out", str(tmp_path / "o"),
                                   "--window", "0"])
    assert isinstance(bad.exception, UserInputError)
