"""GeoJSON import (rasterisation by window) and export (round trip)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from skimage.draw import disk

from diffusiondci.data.annotations import (
    load_class_map,
    load_geojson,
    mask_to_geojson,
    write_geojson,
)
from diffusiondci.errors import UserInputError


def ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, name):
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def write(tmp_path, obj, name="a.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_polygon_with_hole_area(tmp_path):
    poly = {"type": "Polygon", "coordinates": [ring(100, 50, 500, 350), ring(200, 100, 300, 200)]}
    ann = load_geojson(write(tmp_path, {"type": "FeatureCollection", "features": [feature(poly, "Tumor")]}))
    mask = ann.rasterize(0, 0, 600, 400)
    expected = 400 * 300 - 100 * 100
    assert abs((mask == 2).sum() - expected) / expected < 0.01
    assert mask[150, 250] == 0 and mask[60, 110] == 2  # inside the hole / inside the polygon
    # rasterised at a quarter of the resolution the area fraction is the same within 1 %
    small = ann.rasterize(0, 0, 600, 400, 100, 150)
    assert abs((small == 2).mean() - expected / (600 * 400)) < 0.01


def test_circle_area_and_windows(tmp_path):
    angles = np.linspace(0, 2 * np.pi, 721)[:-1]
    circle = [[300 + 120 * math.cos(a), 200 + 120 * math.sin(a)] for a in angles]
    circle.append(circle[0])
    path = write(tmp_path, feature({"type": "Polygon", "coordinates": [circle]}, "Benign"))
    ann = load_geojson(path)
    area = (ann.rasterize(0, 0, 600, 400) == 1).sum()
    assert abs(area - math.pi * 120**2) / (math.pi * 120**2) < 0.01
    # a window partly outside the slide / polygon: same pixels as the crop of the full raster
    full = ann.rasterize(0, 0, 600, 400)
    assert np.array_equal(ann.rasterize(250, 150, 100, 80), full[150:230, 250:350])
    outside = ann.rasterize(550, 350, 100, 100)
    assert outside.shape == (100, 100) and outside.sum() == 0


def test_overlap_precedence_and_variants(tmp_path):
    collection = {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": [ring(0, 0, 100, 100)]}, "Benign"),
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [ring(50, 50, 150, 150)], [ring(180, 180, 190, 190)]]},
         "properties": {"classification": "Malignant"}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [
            {"type": "Polygon", "coordinates": [ring(0, 150, 20, 170)]},
            {"type": "Point", "coordinates": [5, 5]}]},
         "properties": {"name": "normal"}},
    ]}
    mask = load_geojson(write(tmp_path, collection)).rasterize(0, 0, 200, 200)
    assert mask[75, 75] == 2 and mask[25, 25] == 1 and mask[185, 185] == 2 and mask[160, 10] == 1
    assert mask[195, 5] == 0


def test_unknown_class_lists_names_and_class_map_fixes_it(tmp_path):
    obj = [feature({"type": "Polygon", "coordinates": [ring(0, 0, 10, 10)]}, "Stroma"),
           feature({"type": "Polygon", "coordinates": [ring(0, 0, 10, 10)]}, "Necrosis")]
    path = write(tmp_path, obj)
    with pytest.raises(UserInputError) as err:
        load_geojson(path)
    assert "Stroma" in str(err.value) and "Necrosis" in str(err.value) and "--class-map" in str(err.value)
    cmap = tmp_path / "map.yaml"
    cmap.write_text("Stroma: 1\nNecrosis: 2\n")
    mask = load_geojson(path, load_class_map(cmap)).rasterize(0, 0, 20, 20)
    assert (mask == 2).sum() == 100
    bad = tmp_path / "bad.yaml"
    bad.write_text("Stroma: 5\n")
    with pytest.raises(UserInputError, match="0, 1 or 2"):
        load_class_map(bad)


def test_invalid_files(tmp_path):
    broken = tmp_path / "b.geojson"
    broken.write_text("{not json")
    with pytest.raises(UserInputError, match="b.geojson"):
        load_geojson(broken)
    with pytest.raises(UserInputError, match="no features"):
        load_geojson(write(tmp_path, {"type": "FeatureCollection", "features": []}))
    with pytest.raises(UserInputError, match="not a GeoJSON"):
        load_geojson(write(tmp_path, {"hello": 1}))


def test_round_trip_mask_geojson_mask(tmp_path):
    mask = np.zeros((120, 160), np.uint8)
    mask[10:70, 10:90] = 2
    mask[30:50, 30:50] = 0            # a hole
    mask[35:45, 35:45] = 1            # an island of another class inside the hole
    mask[disk((90, 120), 20, shape=mask.shape)] = 1
    mask[100:110, 5:15] = 2           # a second malignant component
    path = write_geojson(mask_to_geojson(mask), tmp_path / "rt.geojson")
    back = load_geojson(path).rasterize(0, 0, 160, 120)
    assert (back == mask).mean() >= 0.995


def test_export_scale_and_offset(tmp_path):
    mask = np.zeros((50, 50), np.uint8)
    mask[10:20, 10:30] = 2
    path = write_geojson(mask_to_geojson(mask, scale=4.0, offset=(1000, 2000)), tmp_path / "s.geojson")
    ann = load_geojson(path)
    region = ann.rasterize(1000, 2000, 200, 200)  # slide pixels of the mask, at full resolution
    assert abs((region == 2).sum() - 10 * 20 * 16) / (10 * 20 * 16) < 0.03
    assert np.array_equal(ann.rasterize(1000, 2000, 200, 200, 50, 50), mask)
