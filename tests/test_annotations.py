"""GeoJSON import (pixel-centre rasterisation by window) and export (lossless round trip)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from shapely.geometry import shape
from skimage.draw import disk, ellipse

from diffusiondci.data.annotations import (
    load_class_map,
    load_geojson,
    mask_to_geojson,
    write_geojson,
)
from diffusiondci.errors import UserInputError


def ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def rect(x0, y0, x1, y1, *holes):
    return {"type": "Polygon", "coordinates": [ring(x0, y0, x1, y1), *[ring(*h) for h in holes]]}


def feature(geometry, name):
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [1, 2, 3]}}}


def write(tmp_path, obj, name="a.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def collection(*features):
    return {"type": "FeatureCollection", "features": list(features)}


def test_polygon_with_hole_area_and_lower_resolution(tmp_path):
    polygon = rect(100, 60, 500, 360, (200, 100, 300, 200))  # 400 x 300 with a 100 x 100 hole
    ann = load_geojson(write(tmp_path, collection(feature(polygon, "Tumor"))))
    mask = ann.rasterize(0, 0, 600, 400)
    assert mask.dtype == np.uint8 and mask.shape == (400, 600)
    expected = 400 * 300 - 100 * 100
    assert abs(int((mask == 2).sum()) - expected) / expected < 0.01
    assert mask[150, 250] == 0 and mask[70, 110] == 2 and mask[10, 10] == 0  # hole / polygon / outside
    # a quarter of the resolution: same area fraction, and it is nearest-neighbour at pixel centres
    small = ann.rasterize(0, 0, 600, 400, 100, 150)
    assert small.shape == (100, 150)
    assert abs((small == 2).mean() - expected / (600 * 400)) < 0.01
    # output pixel (i, j) samples slide point (4j+2, 4i+2), on the same side of every edge as the
    # centre of slide pixel (4i+2, 4j+2)
    assert np.array_equal(small, mask[2::4, 2::4])


def test_circle_area_and_windows(tmp_path):
    angles = np.linspace(0, 2 * np.pi, 721)[:-1]
    circle = [[300 + 120 * math.cos(a), 200 + 120 * math.sin(a)] for a in angles]
    circle.append(circle[0])
    ann = load_geojson(write(tmp_path, feature({"type": "Polygon", "coordinates": [circle]}, "Benign")))
    full = ann.rasterize(0, 0, 600, 400)
    assert abs((full == 1).sum() - math.pi * 120**2) / (math.pi * 120**2) < 0.01
    # independent check: a pixel is labelled iff its centre is inside the circle (up to the 720-gon's sag)
    yy, xx = np.mgrid[0:400, 0:600] + 0.5
    r = np.hypot(xx - 300, yy - 200)
    assert (full[r < 119.9] == 1).all() and (full[r > 120.0] == 0).all()
    # windows: a crop of the full raster; partly outside the slide (negative origin); fully outside
    assert np.array_equal(ann.rasterize(250, 150, 100, 80), full[150:230, 250:350])
    part = ann.rasterize(-50, -20, 400, 300)
    assert np.array_equal(part[20:, 50:], full[:280, :350])
    assert part[:20].sum() == 0 and part[:, :50].sum() == 0
    outside = ann.rasterize(550, 350, 100, 100)
    assert outside.shape == (100, 100) and outside.sum() == 0
    assert ann.labels == [1] and np.allclose(ann.bounds, (180, 80, 420, 320), atol=0.1)


def test_overlap_precedence_and_qupath_variants(tmp_path):
    obj = collection(
        feature(rect(0, 0, 100, 100), "Benign"),
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [ring(50, 50, 150, 150)], [ring(160, 160, 190, 190), ring(170, 170, 180, 180)]]},
         "properties": {"classification": "Malignant"}},                  # classification as a string
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [
            rect(0, 150, 20, 170), {"type": "Point", "coordinates": [5, 5]},
            {"type": "LineString", "coordinates": [[0, 0], [199, 199]]}]},
         "properties": {"name": "normal"}},                               # name fallback, lower case
        feature(rect(0, 0, 200, 200), "BACKGROUND"),                      # background never erases
    )
    mask = load_geojson(write(tmp_path, obj)).rasterize(0, 0, 200, 200)
    assert mask[75, 75] == 2 and mask[25, 25] == 1 and mask[110, 110] == 2 and mask[160, 10] == 1
    assert mask[165, 165] == 2 and mask[175, 175] == 0  # MultiPolygon part with a hole
    assert mask[195, 5] == 0 and mask[5, 195] == 0
    assert (mask == 1).sum() == 100 * 100 - 50 * 50 + 20 * 20
    # a bare Feature, and a bare list, are accepted too
    single = load_geojson(write(tmp_path, feature(rect(2, 2, 6, 6), "cancer"), "f.geojson"))
    assert (single.rasterize(0, 0, 8, 8) == 2).sum() == 16
    listed = load_geojson(write(tmp_path, [feature(rect(2, 2, 6, 6), "Tumour")], "l.geojson"))
    assert (listed.rasterize(0, 0, 8, 8) == 2).sum() == 16


def test_self_intersecting_polygon_is_repaired(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    mask = load_geojson(write(tmp_path, feature(bowtie, "Tumor"))).rasterize(0, 0, 10, 10)
    yy, xx = np.mgrid[0:10, 0:10] + 0.5  # the two triangles of the bowtie, by hand
    expected = (xx > np.maximum(yy, 10 - yy)) | (xx < np.minimum(yy, 10 - yy))
    assert np.array_equal(mask == 2, expected)


def test_unknown_class_lists_names_and_class_map_fixes_it(tmp_path):
    obj = [feature(rect(0, 0, 10, 10), "Stroma"), feature(rect(0, 0, 10, 10), "Necrosis"),
           feature(rect(10, 10, 20, 20), "Tumor")]
    path = write(tmp_path, obj)
    with pytest.raises(UserInputError) as err:
        load_geojson(path)
    message = str(err.value)
    assert "Stroma" in message and "Necrosis" in message and "--class-map" in message
    assert "a.geojson" in message and '"tumor": 2' in message and "\n" not in message
    cmap = tmp_path / "map.yaml"
    cmap.write_text("Stroma: 1\nNECROSIS: 2\n")
    mask = load_geojson(path, load_class_map(cmap)).rasterize(0, 0, 20, 20)
    assert (mask == 2).sum() == 200  # necrosis + the default-mapped tumour
    jmap = tmp_path / "map.json"
    jmap.write_text(json.dumps({"stroma": 0, "necrosis": 0, "Tumor": 1}))  # user entries override defaults
    mask = load_geojson(path, load_class_map(jmap)).rasterize(0, 0, 20, 20)
    assert (mask == 1).sum() == 100 and (mask == 2).sum() == 0
    for bad_text in ("Stroma: 5\n", "Stroma: true\n", "- a\n- b\n", "{oops"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(bad_text)
        with pytest.raises(UserInputError, match="bad.yaml"):
            load_class_map(bad)
    with pytest.raises(UserInputError, match="0, 1 or 2"):
        load_class_map(write(tmp_path, {"x": 3}, "three.json"))


def test_unclassified_annotations(tmp_path):
    plain = {"type": "Feature", "geometry": rect(0, 0, 4, 4), "properties": {"objectType": "annotation"}}
    path = write(tmp_path, collection(plain))
    with pytest.raises(UserInputError, match="unclassified"):
        load_geojson(path)
    assert (load_geojson(path, {"": 1}).rasterize(0, 0, 5, 5) == 1).sum() == 16
    assert (load_geojson(path, {"Unclassified": 2}).rasterize(0, 0, 5, 5) == 2).sum() == 16


def test_invalid_files(tmp_path):
    broken = tmp_path / "b.geojson"
    broken.write_text("{not json")
    with pytest.raises(UserInputError, match="b.geojson"):
        load_geojson(broken)
    with pytest.raises(UserInputError, match="no polygon"):
        load_geojson(write(tmp_path, collection(), "empty.geojson"))
    with pytest.raises(UserInputError, match="no polygon"):
        load_geojson(write(tmp_path, collection(feature({"type": "Point", "coordinates": [1, 2]}, "Tumor"))))
    with pytest.raises(UserInputError, match="not a GeoJSON"):
        load_geojson(write(tmp_path, {"hello": 1}))
    with pytest.raises(UserInputError, match="feature 0"):
        load_geojson(write(tmp_path, feature({"type": "Polygon", "coordinates": [[[0, "x"]]]}, "Tumor")))
    with pytest.raises(UserInputError, match="missing.geojson"):
        load_geojson(tmp_path / "missing.geojson")


def _two_class_mask():
    mask = np.zeros((120, 160), np.uint8)
    mask[10:70, 10:90] = 2
    mask[30:50, 30:50] = 0            # a hole
    mask[33:47, 33:47] = 2            # a malignant island inside the hole (same class, nested) ...
    mask[38:42, 38:42] = 1            # ... whose own hole holds benign tissue
    mask[25:55, 55:85] = 1            # a benign region inside the malignant one ...
    mask[35:45, 65:75] = 2            # ... with a malignant island
    mask[disk((90, 120), 20, shape=mask.shape)] = 1
    mask[100:110, 5:15] = 2           # a second malignant component
    mask[80, 60] = mask[81, 61] = 2   # single pixels touching only diagonally
    mask[0:5, 150:160] = 1            # touching the mask border
    return mask


def test_round_trip_is_exact(tmp_path):
    mask = _two_class_mask()
    obj = mask_to_geojson(mask)
    assert [f["properties"]["classification"]["name"] for f in obj["features"]] == ["Benign", "Malignant"]
    for f in obj["features"]:
        assert f["properties"]["objectType"] == "annotation" and f["geometry"]["type"] == "MultiPolygon"
        assert len(f["properties"]["classification"]["color"]) == 3
    malignant = obj["features"][1]["geometry"]["coordinates"]
    assert len(malignant) == 6 and sorted(len(p) for p in malignant)[-2:] == [2, 3]  # 6 parts, holes: 2 + 1
    back = load_geojson(write_geojson(obj, tmp_path / "rt.geojson")).rasterize(0, 0, 160, 120)
    assert np.array_equal(back, mask)
    assert [p.name for p in tmp_path.iterdir()] == ["rt.geojson"]  # atomic write left no temp file
    # random label noise (many holes, diagonal contacts, both classes interleaved)
    rng = np.random.default_rng(0)
    noise = (rng.random((40, 50)) < 0.5) * rng.integers(1, 3, (40, 50))
    noise = noise.astype(np.uint8)
    back = load_geojson(write_geojson(mask_to_geojson(noise), tmp_path / "n.geojson")).rasterize(0, 0, 50, 40)
    assert np.array_equal(back, noise)


def test_export_scale_offset_simplify_and_min_area(tmp_path):
    mask = np.zeros((50, 50), np.uint8)
    mask[10:20, 10:30] = 2
    mask[40, 40] = 1
    obj = mask_to_geojson(mask, scale=4.0, offset=(1000, 2000))
    # mask rows 10..19, cols 10..29 -> slide [1040, 1120) x [2040, 2080); boundaries pass between centres
    assert np.allclose(shape(obj["features"][1]["geometry"]).bounds, (1040, 2040, 1120, 2080))
    ann = load_geojson(write_geojson(obj, tmp_path / "s.geojson"))
    region = ann.rasterize(1000, 2000, 200, 200)  # slide pixels of the mask, at full resolution
    assert abs((region == 2).sum() - 10 * 20 * 16) / (10 * 20 * 16) < 0.03
    assert np.array_equal(ann.rasterize(1000, 2000, 200, 200, 50, 50), mask)
    # min_area_px drops small components (counted in mask pixels), keeps the rest
    kept = mask_to_geojson(mask, min_area_px=2)
    assert [f["properties"]["classification"]["name"] for f in kept["features"]] == ["Malignant"]
    assert kept["features"][0]["geometry"]["type"] == "Polygon"  # a single component
    # custom class names; simplification keeps >= 99.5 % agreement on a smooth blob
    blob = np.zeros((200, 200), np.uint8)
    blob[ellipse(100, 90, 70, 50, shape=blob.shape, rotation=0.6)] = 1
    blob[disk((60, 150), 30, shape=blob.shape)] = 1
    blob[disk((100, 90), 15, shape=blob.shape)] = 0
    named = mask_to_geojson(blob, class_names=("bg", "lesion"), simplify_px=1.0)
    assert named["features"][0]["properties"]["classification"]["name"] == "Lesion"
    back = load_geojson(write_geojson(named, tmp_path / "b.geojson"), {"lesion": 1}).rasterize(0, 0, 200, 200)
    assert (back == blob).mean() >= 0.995
    with pytest.raises(ValueError):
        mask_to_geojson(np.full((3, 3), 3, np.uint8))


def test_exported_classes_carry_the_overlay_colours():
    from diffusiondci import LABEL_COLOURS
    from diffusiondci.data.preview import colour_mask

    mask = np.zeros((40, 40), np.uint8)
    mask[5:20, 5:20], mask[25:35, 25:35] = 1, 2
    colours = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
               for f in mask_to_geojson(mask)["features"]}
    assert colours == {"Benign": list(LABEL_COLOURS[1]), "Malignant": list(LABEL_COLOURS[2])}
    assert colour_mask(np.array([1, 2])).tolist() == [list(LABEL_COLOURS[1]), list(LABEL_COLOURS[2])]


def test_qupath_derived_classes(tmp_path):
    def derived(geometry, names):
        return {"type": "Feature", "geometry": geometry,
                "properties": {"objectType": "annotation", "classification": {"names": names, "color": [1, 2, 3]}}}

    obj = collection(derived(rect(0, 0, 10, 10), ["Tumor", "Positive"]),        # first part known: 2
                     derived(rect(10, 0, 20, 10), ["Stroma", "Benign"]),        # first *known* part: 1
                     feature(rect(0, 10, 10, 20), "Benign: Negative"))          # a name written joined: 1
    mask = load_geojson(write(tmp_path, obj)).rasterize(0, 0, 20, 20)
    assert (mask[:10, :10] == 2).all() and (mask[:10, 10:] == 1).all() and (mask[10:, :10] == 1).all()
    # the full name wins over its parts, and an unmapped derived class is reported by its full name
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"Tumor: Positive": 1}))
    assert (load_geojson(write(tmp_path, obj), load_class_map(cmap)).rasterize(0, 0, 10, 10) == 1).all()
    with pytest.raises(UserInputError, match="'Necrosis: Positive'"):
        load_geojson(write(tmp_path, collection(derived(rect(0, 0, 10, 10), ["Necrosis", "Positive"]))))


def test_unknown_class_suggests_stroma_as_background(tmp_path):
    with pytest.raises(UserInputError, match=r'"Stroma": 0'):
        load_geojson(write(tmp_path, collection(feature(rect(0, 0, 10, 10), "Stroma"))))


def test_warning_when_annotations_lie_outside_the_slide(tmp_path):
    ann = load_geojson(write(tmp_path, collection(feature(rect(100, 50, 300, 250), "Tumor"))))
    assert ann.fraction_inside(400, 400) == 1.0 and not ann.warn_if_outside(400, 400)
    assert abs(ann.fraction_inside(150, 200) - 0.25) < 1e-9  # x 100..200 of 100..300, y 50..150 of 50..250
    with pytest.warns(UserWarning, match=r"a\.geojson: only 25% of the annotated area lies inside the slide: "
                                         r"the annotations span x 100\.\.300, y 50\.\.250 px but the slide is "
                                         r"200x150 px \(width x height\)"):
        assert ann.warn_if_outside(150, 200)
