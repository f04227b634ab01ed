"""`diffusiondci rasterize`: QuPath GeoJSON -> label images for evaluate-seg."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from diffusiondci.cli import app
from diffusiondci.data.imageio import read_mask
from diffusiondci.data.phantom import write_sample
from diffusiondci.data.rasterize import rasterize_paths
from diffusiondci.errors import UserInputError


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("raster")
    write_sample(root / "sample", seed=3, size=(320, 288), tile_size=128)
    return root / "sample"


def test_geojson_slide_matches_its_ground_truth(sample, tmp_path):
    written = rasterize_paths([sample / "slides"], tmp_path / "out", log=lambda m: None)
    geo = sorted(p.stem for p in (sample / "slides").glob("*.geojson"))
    assert [p.name for p in written] == [f"{s}_mask.png" for s in geo]  # slides without GeoJSON are skipped
    for path in written:
        got, truth = read_mask(path), read_mask(sample / "truth" / path.name)
        assert got.shape == truth.shape
        assert set(np.unique(got)) <= {0, 1, 2} and set(np.unique(truth)) - {0} <= set(np.unique(got))
        assert (got == truth).mean() > 0.98  # polygon outlines are simplified a little on export


def test_downsampled_mask_samples_pixel_centres(sample, tmp_path):
    full = read_mask(rasterize_paths([sample / "slides"], tmp_path / "full", log=None)[0])
    small = read_mask(rasterize_paths([sample / "slides"], tmp_path / "small", downsample=3, log=None)[0])
    assert small.shape == (-(-full.shape[0] // 3), -(-full.shape[1] // 3))
    assert (small == full[1::3, 1::3]).mean() > 0.99


def test_errors_and_cli(sample, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    png = next(p for p in sorted((sample / "slides").glob("*.png")) if not p.stem.endswith("_mask"))  # a slide
    (lonely / png.name).write_bytes(png.read_bytes())
    with pytest.raises(UserInputError, match="no <stem>.geojson"):
        rasterize_paths([lonely], tmp_path / "o")
    with pytest.raises(UserInputError, match="downsample"):
        rasterize_paths([sample / "slides"], tmp_path / "o", downsample=0)
    result = CliRunner().invoke(app, ["rasterize", str(sample / "slides"), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "cli").glob("*_mask.png"))


def test_annotations_outside_the_slide_warn(sample, tmp_path):
    import json
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample / "slides" / "phantom_001.png", folder / "s.png")
    square = [[[1000, 1000], [1200, 1000], [1200, 1200], [1000, 1200], [1000, 1000]]]  # slide is 288x320
    (folder / "s.geojson").write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
                                                  "properties": {"classification": {"name": "Tumor"}}}))
    with pytest.warns(UserWarning, match=r"s\.geojson: none of the annotated area.*slide is 288x320 px"):
        rasterize_paths([folder], tmp_path / "o", log=None)
