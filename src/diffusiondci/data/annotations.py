"""Masks from QuPath GeoJSON exports, and label maps back to QuPath GeoJSON.

Coordinates follow QuPath: x to the right, y down, in slide pixels; pixel (row r, column c) covers
the square [c, c+1) x [r, r+1) and belongs to a polygon when its centre (c + 0.5, r + 0.5) is inside.

Import: a FeatureCollection, a bare list of features or a single Feature; geometries Polygon,
MultiPolygon (holes honoured) or GeometryCollection of those (points and lines are ignored). The
class name is read from ``properties.classification.name`` (QuPath >= 0.3), ``classification`` as a
string, or ``name`` / ``class``. Names are mapped to labels case-insensitively by a class map
(:data:`DEFAULT_CLASS_MAP`, or ``--class-map FILE``). Unannotated area is 0 (background); where
polygons of different classes overlap, the higher label wins (malignant over benign).
Rasterisation works on a window and straight at the output resolution, so a 21k x 21k slide never
needs a full-size mask in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import shapely
import yaml
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, box, mapping, shape

from ..errors import UserInputError

DEFAULT_CLASS_MAP: dict[str, int] = {
    "background": 0, "benign": 1, "normal": 1, "malignant": 2, "tumor": 2, "tumour": 2, "cancer": 2,
}
EXPORT_CLASSES = {1: ("Benign", [0, 200, 200]), 2: ("Malignant", [230, 200, 0])}


# --------------------------------------------------------------------------- class maps
def load_class_map(path: str | Path) -> dict[str, int]:
    """Read a YAML or JSON mapping ``class name -> label`` (labels 0, 1 or 2)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"cannot read class map ({str(exc).splitlines()[0]})", path) from exc
    if not isinstance(data, dict) or not data:
        raise UserInputError('class map must be a mapping like {"Tumor": 2, "Stroma": 0}', path)
    out = {}
    for name, label in data.items():
        if isinstance(label, bool) or label not in (0, 1, 2):
            raise UserInputError(f"class '{name}' maps to {label!r}; labels must be 0, 1 or 2", path)
        out[str(name).strip().lower()] = int(label)
    return out


def _class_name(props: dict | None) -> str:
    props = props or {}
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str) and cls:
        return cls
    for key in ("name", "class"):
        if isinstance(props.get(key), str) and props[key]:
            return props[key]
    return "Unclassified"


def _features(obj, path: Path) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        return list(obj.get("features") or [])
    if isinstance(obj, dict) and obj.get("type") == "Feature":
        return [obj]
    raise UserInputError("not a GeoJSON FeatureCollection, Feature or list of features", path)


def _areas(geom) -> Iterator[Polygon | MultiPolygon]:
    if isinstance(geom, (Polygon, MultiPolygon)):
        yield geom
    elif isinstance(geom, GeometryCollection):
        for g in geom.geoms:
            yield from _areas(g)


# --------------------------------------------------------------------------- import
class GeoJSONAnnotation:
    """Polygons of one slide grouped by label; :meth:`rasterize` gives a window's label mask."""

    def __init__(self, path: Path, by_label: dict[int, object]):
        self.path = path
        self.by_label = by_label  # label -> union geometry (labels 1 and 2)
        for geom in by_label.values():
            shapely.prepare(geom)

    def rasterize(self, x: int, y: int, w: int, h: int, out_h: int | None = None,
                  out_w: int | None = None) -> np.ndarray:
        """Label mask of the window [x, x+w) x [y, y+h), sampled at ``out_h x out_w`` pixel centres."""
        out_h, out_w = out_h or h, out_w or w
        out = np.zeros((out_h, out_w), np.uint8)
        window = box(x, y, x + w, y + h)
        # centres of the output pixels, in slide coordinates
        xs = x + (np.arange(out_w) + 0.5) * (w / out_w)
        ys = y + (np.arange(out_h) + 0.5) * (h / out_h)
        for label in sorted(self.by_label):  # increasing: higher labels overwrite lower ones
            geom = self.by_label[label]
            if not geom.intersects(window):
                continue
            x0, y0, x1, y1 = geom.bounds
            cols = np.nonzero((xs >= x0) & (xs <= x1))[0]
            rows = np.nonzero((ys >= y0) & (ys <= y1))[0]
            if not len(cols) or not len(rows):
                continue
            gx, gy = np.meshgrid(xs[cols], ys[rows])
            inside = shapely.contains_xy(geom, gx, gy)
            block = out[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
            block[inside] = label
        return out


def load_geojson(path: str | Path, class_map: dict[str, int] | None = None) -> GeoJSONAnnotation:
    """Parse a QuPath GeoJSON export; see the module docstring for what is accepted."""
    path = Path(path)
    mapping_ = {k.lower(): v for k, v in (class_map or DEFAULT_CLASS_MAP).items()}
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read GeoJSON ({exc}); re-export it from QuPath", path) from exc
    features = _features(obj, path)
    if not features:
        raise UserInputError("GeoJSON has no features; export the annotations from QuPath", path)
    unknown: set[str] = set()
    parts: dict[int, list] = {1: [], 2: []}
    for feature in features:
        if not isinstance(feature, dict) or not feature.get("geometry"):
            continue
        name = _class_name(feature.get("properties"))
        label = mapping_.get(name.strip().lower())
        if label is None:
            unknown.add(name)
            continue
        try:
            geom = shape(feature["geometry"])
        except Exception as exc:  # shapely raises several types for malformed coordinates
            raise UserInputError(f"invalid geometry in a '{name}' feature ({exc})", path) from exc
        for area in _areas(geom):
            if not area.is_valid:
                area = shapely.make_valid(area)
            area = shapely.union_all([a for a in _areas(area)]) if not isinstance(area, (Polygon, MultiPolygon)) else area
            if label > 0 and not area.is_empty:
                parts[label].append(area)
    if unknown:
        raise UserInputError(
            f"unknown class name(s) {sorted(unknown)}; current mapping {mapping_}; pass --class-map FILE "
            'with e.g. {"Tumor": 2, "Stroma": 0}', path,
        )
    return GeoJSONAnnotation(path, {lbl: shapely.union_all(g) for lbl, g in parts.items() if g})


# --------------------------------------------------------------------------- export
def _class_geometry(binary: np.ndarray):
    """Polygons (with holes) whose pixel-centre rasterisation is ``binary``, in mask pixels."""
    from skimage.measure import find_contours

    padded = np.pad(binary.astype(np.float32), 1)
    rings = []
    for contour in find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        # padded index (r, c) is mask pixel (r-1, c-1), whose centre is (c - 0.5, r - 0.5)
        poly = shapely.make_valid(Polygon(np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)))
        if not poly.is_empty and poly.area > 0:
            rings.append(poly)
    if not rings:
        return None
    geom = rings[0]
    for poly in rings[1:]:  # even-odd rule: nested contours alternate between boundaries and holes
        geom = geom.symmetric_difference(poly)
    geom = shapely.make_valid(geom.simplify(0.25, preserve_topology=True))
    polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and g.area > 0]
    if not polys:
        return None
    polys = [shapely.geometry.polygon.orient(p, 1.0) for p in polys]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def mask_to_geojson(mask: np.ndarray, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0),
                    min_area_px: float = 0.0) -> dict:
    """A QuPath-importable FeatureCollection with one (Multi)Polygon feature per lesion class.

    Mask pixel (r, c) stands for the slide square [c*scale + ox, (c+1)*scale + ox) x [...]: use
    ``scale`` = the downsample of the mask and ``offset`` = its top-left corner in the slide.
    Components smaller than ``min_area_px`` mask pixels are dropped.
    """
    features = []
    for label, (name, colour) in EXPORT_CLASSES.items():
        geom = _class_geometry(np.asarray(mask) == label)
        if geom is None:
            continue
        if min_area_px > 0:
            keep = [p for p in getattr(geom, "geoms", [geom]) if p.area >= min_area_px]
            if not keep:
                continue
            geom = keep[0] if len(keep) == 1 else MultiPolygon(keep)
        geom = shapely.affinity.affine_transform(geom, [scale, 0, 0, scale, offset[0], offset[1]])
        geometry = json.loads(json.dumps(mapping(geom)), parse_float=lambda s: round(float(s), 2))
        features.append({
            "type": "Feature",
            "id": f"diffusiondci-{name.lower()}",
            "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": colour}},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
