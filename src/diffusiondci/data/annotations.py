"""Masks from QuPath GeoJSON exports, and label masks back to QuPath GeoJSON.

The paper's DCI slides are annotated in QuPath (Sec. II-A) and turned into semantic masks with
labels 0 background, 1 benign, 2 malignant; this module does that conversion and its reverse.

Coordinates follow QuPath: x to the right, y down, in slide pixels. Slide pixel (row r, column c)
covers the square [c, c+1) x [r, r+1); **a pixel gets a polygon's label when its centre
(c + 0.5, r + 0.5) lies strictly inside the polygon** (centres exactly on an edge are outside).
At a reduced output resolution the same rule is applied to the centres of the output pixels.

Import (:func:`load_geojson`): a FeatureCollection, a bare list of features or a single Feature;
geometries Polygon, MultiPolygon (holes honoured) or GeometryCollection of those (points and lines
are ignored; self-intersecting polygons are repaired with :func:`shapely.make_valid`). The class
name is ``properties.classification.name`` (QuPath >= 0.3), ``properties.classification`` as a
string, else ``properties.name`` / ``properties.class``; a feature with none of these is
"unclassified" and needs a class-map entry ``""`` or ``"Unclassified"``. Names map to labels
case-insensitively through :data:`DEFAULT_CLASS_MAP`, extended/overridden by a user class map.
QuPath *derived* classes (``classification.names``, a list such as ``["Tumor", "Positive"]``,
with or without a ``name``) are looked up by their full name ``"Tumor: Positive"`` first, then
part by part from the first: the first part with a label gives it (``Tumor`` here); a derived
class none of whose parts is mapped is reported as unknown under its full name. The same
part-by-part fallback applies to a ``name`` written as ``"Tumor: Positive"``.
Unannotated area is 0; where classes overlap **the higher label wins** (malignant over benign over
background), so an explicit "background" polygon never erases a lesion.

Export (:func:`mask_to_geojson`): one (Multi)Polygon feature per class > 0, with holes, whose
pixel-centre rasterisation reproduces the mask exactly (at ``simplify_px`` <= 0.3).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
import yaml
from scipy import ndimage
from shapely.geometry import GeometryCollection, LinearRing, MultiPolygon, Polygon, box, mapping, shape
from shapely.geometry.polygon import orient

from .. import CLASS_NAMES, LABEL_COLOURS
from ..errors import UserInputError

__all__ = [
    "DEFAULT_CLASS_MAP", "GeoJSONAnnotation", "load_class_map", "load_geojson", "mask_to_geojson",
    "write_geojson",
]

#: Built-in class names (compared case-insensitively). Deliberately conservative: anything else
#: (e.g. "Stroma", "Necrosis") must be mapped explicitly with ``--class-map``.
DEFAULT_CLASS_MAP: dict[str, int] = {
    "background": 0, "benign": 1, "normal": 1, "malignant": 2, "tumor": 2, "tumour": 2, "cancer": 2,
}
#: Display colours (RGB) written with exported classes, by label: the overlays' colours.
CLASS_COLOURS: dict[int, list[int]] = {label: list(LABEL_COLOURS[label]) for label in (1, 2)}
_UNCLASSIFIED = ("", "unclassified")
_CLASS_MAP_EXAMPLE = '{"Tumor": 2, "Stroma": 0}'
_EXACT_TOLERANCE = 0.3  # mask px; pixel centres are >= 0.35 px from the traced boundary
#: :meth:`GeoJSONAnnotation.warn_if_outside` warns below this share of lesion area inside the slide.
MIN_INSIDE = 0.5


# --------------------------------------------------------------------------- class maps
def load_class_map(path: str | Path) -> dict[str, int]:
    """Read a YAML or JSON mapping ``class name -> label`` (labels 0, 1 or 2).

    Names are returned lower-cased (matching is case-insensitive); ``""`` or ``"Unclassified"``
    maps annotations that have no class.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"cannot read class map ({first}); write e.g. {_CLASS_MAP_EXAMPLE}"
        raise UserInputError(msg, path) from exc
    if not isinstance(data, dict) or not data:
        msg = f"class map must be a mapping of class name to label, e.g. {_CLASS_MAP_EXAMPLE}"
        raise UserInputError(msg, path)
    out: dict[str, int] = {}
    for name, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1, 2):
            raise UserInputError(
                f"class {name!r} maps to {label!r}; labels must be 0, 1 or 2 (background, benign, malignant)",
                path,
            )
        out["" if name is None else str(name).strip().lower()] = label
    return out


def _effective_map(class_map: Mapping[str, int] | None) -> dict[str, int]:
    merged = dict(DEFAULT_CLASS_MAP)
    merged.update({str(k).strip().lower(): int(v) for k, v in (class_map or {}).items()})
    for name in _UNCLASSIFIED:  # "" and "Unclassified" are the same thing
        if name in merged:
            merged.setdefault(_UNCLASSIFIED[0], merged[name])
            merged.setdefault(_UNCLASSIFIED[1], merged[name])
    return merged


def _class_names(props) -> list[str]:
    """QuPath class of a feature as lookup candidates: its full name first ("" when it has none),
    then, for a derived class, its parts in order (see the module docstring)."""
    if not isinstance(props, dict):
        return [""]
    cls = props.get("classification")
    parts: list[str] = []
    if isinstance(cls, dict) and isinstance(cls.get("names"), list):
        parts = [n.strip() for n in cls["names"] if isinstance(n, str) and n.strip()]
    if isinstance(cls, dict) and isinstance(cls.get("name"), str) and cls["name"].strip():
        full = cls["name"].strip()
    elif parts:
        full = ": ".join(parts)
    elif isinstance(cls, str) and cls.strip():
        full = cls.strip()
    else:
        full = next((v.strip() for v in (props.get("name"), props.get("class"))
                     if isinstance(v, str) and v.strip()), "")
    if not parts and ":" in full:
        parts = [n.strip() for n in full.split(":") if n.strip()]
    return [full] + [n for n in parts if n != full]


# --------------------------------------------------------------------------- import
def _features(obj, path: Path) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise UserInputError("FeatureCollection has no 'features' list; re-export it from QuPath", path)
        return features
    if isinstance(obj, dict) and obj.get("type") == "Feature":
        return [obj]
    raise UserInputError(
        "not a GeoJSON FeatureCollection, Feature or list of features; export annotations from QuPath "
        "with File > Export objects as GeoJSON", path,
    )


def _areas(geom) -> Iterator[Polygon]:
    """The polygons in ``geom`` (points, lines and empty parts dropped)."""
    if isinstance(geom, Polygon):
        if not geom.is_empty:
            yield geom
    elif isinstance(geom, (MultiPolygon, GeometryCollection)):
        for part in geom.geoms:
            yield from _areas(part)


def _feature_area(feature: dict, name: str, index: int, path: Path):
    """Valid polygonal part of a feature's geometry, or ``None`` when it has no area."""
    where = f"feature {index} ({name or 'unclassified'})"
    try:
        geom = shape(feature["geometry"])
    except Exception as exc:  # shapely/GEOS raise several types for malformed coordinates
        raise UserInputError(f"invalid geometry in {where} ({exc}); re-export it from QuPath", path) from exc
    if not np.isfinite(shapely.get_coordinates(geom)).all():
        raise UserInputError(f"non-finite coordinates in {where}; re-export it from QuPath", path)
    polys = list(_areas(geom))
    if not polys:
        return None
    try:
        area = shapely.union_all([p if p.is_valid else shapely.make_valid(p) for p in polys])
        area = shapely.union_all(list(_areas(area)))  # make_valid may add lines/points: drop them
    except shapely.errors.GEOSException as exc:
        raise UserInputError(f"cannot repair the polygon of {where} ({exc}); fix it in QuPath", path) from exc
    return None if area.is_empty or area.area <= 0 else area


class GeoJSONAnnotation:
    """Polygons of one slide grouped by label; :meth:`rasterize` gives any window's label mask."""

    def __init__(self, path: Path | None, by_label: dict[int, object]):
        self.path = path
        #: label (1 or 2) -> union of that class's polygons, in slide pixels
        self.by_label = {k: v for k, v in sorted(by_label.items()) if k > 0 and not v.is_empty}
        for geom in self.by_label.values():
            shapely.prepare(geom)

    @property
    def labels(self) -> list[int]:
        """Labels that have at least one polygon."""
        return list(self.by_label)

    @property
    def bounds(self) -> tuple[float, float, float, float] | None:
        """(xmin, ymin, xmax, ymax) of all lesion polygons, ``None`` when there are none."""
        if not self.by_label:
            return None
        return tuple(shapely.union_all(list(self.by_label.values())).bounds)

    def fraction_inside(self, height: int, width: int) -> float:
        """Share of the lesion area inside a ``height x width`` slide (1.0 without lesions)."""
        if not self.by_label:
            return 1.0
        union = shapely.union_all(list(self.by_label.values()))
        return float(union.intersection(box(0, 0, width, height)).area / union.area) if union.area else 1.0

    def warn_if_outside(self, height: int, width: int, min_inside: float = MIN_INSIDE) -> bool:
        """Warn (and return True) when less than ``min_inside`` of the lesion area lies inside a
        ``height x width`` slide: the GeoJSON was probably exported from another resolution or
        pyramid level, and patches would silently get (almost) empty masks."""
        inside = self.fraction_inside(height, width)
        if inside >= min_inside:
            return False
        x0, y0, x1, y1 = (round(v) for v in self.bounds)
        share = "none" if inside == 0 else f"only {inside:.0%}" if inside >= 0.01 else "under 1%"
        warnings.warn(
            f"{self.path}: {share} of the annotated area lies inside the slide: the annotations span "
            f"x {x0}..{x1}, y {y0}..{y1} px but the slide is {width}x{height} px (width x height); "
            "were they exported from another resolution or pyramid level? Masks get labels only "
            "from the part inside the slide",
            UserWarning, stacklevel=2,
        )
        return True

    def rasterize(self, x: float, y: float, w: float, h: float, out_h: int | None = None,
                  out_w: int | None = None) -> np.ndarray:
        """Label mask (``uint8``, ``out_h x out_w``) of the slide window [x, x+w) x [y, y+h).

        Output pixel (i, j) takes the label of the slide point at its centre,
        (x + (j + 0.5) w / out_w, y + (i + 0.5) h / out_h), so the window is sampled straight at
        the output resolution (nearest-neighbour downsampling, no full-size mask). Parts of the
        window outside the slide or the annotations are 0; higher labels overwrite lower ones.
        """
        out_h = int(h if out_h is None else out_h)
        out_w = int(w if out_w is None else out_w)
        if w <= 0 or h <= 0 or out_h <= 0 or out_w <= 0:
            raise ValueError(f"window and output sizes must be positive, got w={w} h={h} out={out_h}x{out_w}")
        out = np.zeros((out_h, out_w), np.uint8)
        xs = x + (np.arange(out_w) + 0.5) * (w / out_w)
        ys = y + (np.arange(out_h) + 0.5) * (h / out_h)
        window = box(x, y, x + w, y + h)
        for label, geom in self.by_label.items():  # increasing label: higher labels overwrite
            if not geom.intersects(window):
                continue
            gx0, gy0, gx1, gy1 = geom.bounds  # only test centres inside the class's bounding box
            cols = np.nonzero((xs > gx0) & (xs < gx1))[0]
            rows = np.nonzero((ys > gy0) & (ys < gy1))[0]
            if cols.size == 0 or rows.size == 0:
                continue
            px, py = np.meshgrid(xs[cols[0]: cols[-1] + 1], ys[rows[0]: rows[-1] + 1])
            inside = shapely.contains_xy(geom, px, py)
            out[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1][inside] = label
        return out


def load_geojson(path: str | Path, class_map: Mapping[str, int] | None = None) -> GeoJSONAnnotation:
    """Parse a QuPath GeoJSON export (see the module docstring for what is accepted).

    ``class_map`` (name -> 0/1/2, e.g. from :func:`load_class_map`) extends and overrides
    :data:`DEFAULT_CLASS_MAP`. Raises :class:`UserInputError` for unreadable or non-GeoJSON files,
    files without polygons, broken geometry and class names that are not mapped (all listed).
    """
    path = Path(path)
    names_to_labels = _effective_map(class_map)
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"cannot read GeoJSON ({msg}); re-export the annotations from QuPath"
        raise UserInputError(msg, path) from exc
    features = _features(obj, path)
    unknown: set[str] = set()
    parts: dict[int, list] = {0: [], 1: [], 2: []}
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            continue
        names = _class_names(feature.get("properties"))
        name = names[0]
        label = next((names_to_labels[n.lower()] for n in names if n.lower() in names_to_labels), None)
        if label is None:
            unknown.add(name)
            continue
        area = _feature_area(feature, name, index, path)
        if area is not None:
            parts[label].append(area)
    if unknown:
        shown = sorted("(unclassified)" if n == "" else n for n in unknown)
        fix = f'--class-map FILE, e.g. a JSON/YAML file with {_CLASS_MAP_EXAMPLE}'
        if "" in unknown:
            fix += ' (use "" for unclassified annotations)'
        raise UserInputError(
            f"unknown annotation class(es) {', '.join(repr(n) for n in shown)}; current mapping "
            f"{json.dumps(dict(sorted(names_to_labels.items())))}; map them to 0/1/2 with {fix}", path,
        )
    if not any(parts.values()):
        raise UserInputError(
            "GeoJSON has no polygon annotations; draw/export area annotations in QuPath", path
        )
    return GeoJSONAnnotation(path, {lbl: shapely.union_all(g) for lbl, g in parts.items() if lbl > 0 and g})


# --------------------------------------------------------------------------- export
def _binary_to_polygons(binary: np.ndarray, tolerance: float) -> list[Polygon]:
    """Polygons (with holes), in mask pixel coordinates (pixel (r, c) = [c, c+1) x [r, r+1)), whose
    pixel-centre rasterisation is ``binary`` (exactly, for ``tolerance`` < 0.35).

    Boundaries are the 0.5 iso-contours of the padded mask between pixel centres (marching squares,
    :func:`skimage.measure.find_contours`): foreground is 4-connected, so rings never touch and
    pixels touching only diagonally become separate polygons. Outer rings and holes are told apart by
    orientation; each hole belongs to the smallest outer ring containing it.
    """
    from skimage.measure import find_contours

    padded = np.pad(binary.astype(np.float32), 1)
    shells: list[LinearRing] = []
    holes: list[LinearRing] = []
    for contour in find_contours(padded, 0.5, fully_connected="low", positive_orientation="low"):
        # padded index (r, c) is mask pixel (r-1, c-1), whose centre is at (c - 0.5, r - 0.5)
        ring = LinearRing(np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1))
        (shells if ring.is_ccw else holes).append(ring)
    shell_polys = [Polygon(s) for s in shells]
    hole_lists: list[list[LinearRing]] = [[] for _ in shells]
    if holes and shell_polys:
        tree = shapely.STRtree(shell_polys)
        starts = shapely.points([np.asarray(h.coords[0]) for h in holes])
        hole_idx, shell_idx = tree.query(starts, predicate="within")
        areas = np.array([p.area for p in shell_polys])
        best: dict[int, int] = {}
        for hi, si in zip(hole_idx.tolist(), shell_idx.tolist()):
            if hi not in best or areas[si] < areas[best[hi]]:
                best[hi] = si
        for hi, si in best.items():
            hole_lists[si].append(holes[hi])
    polys = []
    for shell, its_holes in zip(shells, hole_lists):
        poly = Polygon(shell, its_holes)
        if tolerance > 0:
            poly = poly.simplify(tolerance, preserve_topology=True)
        if not poly.is_valid:
            poly = shapely.union_all(list(_areas(shapely.make_valid(poly))))
        polys.extend(orient(p, 1.0) for p in _areas(poly) if p.area > 0)
    return polys


def mask_to_geojson(
    mask: np.ndarray,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    class_names: Sequence[str] = CLASS_NAMES,
    min_area_px: float = 0,
    simplify_px: float = 0.0,
) -> dict:
    """A QuPath-importable FeatureCollection with one feature per class > 0 present in ``mask``.

    The geometry is a MultiPolygon with holes (a Polygon when the class has a single component).

    Mask pixel (i, j) stands for the slide square [j*scale + ox, (j+1)*scale + ox) x
    [i*scale + oy, (i+1)*scale + oy): pass ``scale`` = the mask's downsample and ``offset`` = its
    top-left corner in the slide. ``class_names[k]`` (capitalised) names label k. Connected
    components (4-connected) of fewer than ``min_area_px`` mask pixels are dropped (holes are
    kept). Boundaries are simplified with tolerance ``max(simplify_px, 0.3)`` mask pixels; at the
    default the export is lossless: :meth:`GeoJSONAnnotation.rasterize` of the same window at the
    mask's size gives the mask back pixel for pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    if mask.size and int(mask.max()) >= len(class_names):
        raise ValueError(f"mask has label {int(mask.max())} but only {len(class_names)} class names")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    tolerance = max(float(simplify_px), _EXACT_TOLERANCE)
    features = []
    for label in range(1, len(class_names)):
        binary = mask == label
        if min_area_px > 0 and binary.any():
            components, _ = ndimage.label(binary)  # 4-connected, as in _binary_to_polygons
            sizes = np.bincount(components.ravel())
            binary = (sizes >= min_area_px)[components] & binary
        if not binary.any():
            continue
        polys = _binary_to_polygons(binary, tolerance)
        geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        geom = shapely.affinity.affine_transform(geom, [scale, 0, 0, scale, offset[0], offset[1]])
        geometry = json.loads(json.dumps(mapping(geom)), parse_float=lambda s: round(float(s), 3))
        name = str(class_names[label]).capitalize()
        digest = hashlib.sha1(json.dumps(geometry).encode()).hexdigest()
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"diffusiondci:{name}:{digest}")),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": CLASS_COLOURS.get(label, [128, 128, 128])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
