"""End-to-end tests of `diffusiondci prepare` / `import-patches` and of their error handling."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from diffusiondci import cli
from diffusiondci.config import build, load_section
from diffusiondci.data import prepare as prepare_mod
from diffusiondci.data.phantom import write_sample
from diffusiondci.data.prepare import PrepareConfig, prepare_dataset
from diffusiondci.errors import UserInputError

GLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"


def tiny_cfg(**kw) -> PrepareConfig:
    return build(PrepareConfig, load_section("tiny", "prepare"), **kw)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    write_sample(root, seed=3)
    return root


@pytest.fixture(scope="module")
def dataset(sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    prepare_dataset(sample / "slides", out, tiny_cfg(), groups_csv=sample / "slides" / "groups.csv",
                    log=lambda m: None)
    return out


def read_manifest(ds: Path) -> list[dict]:
    with (ds / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["diffusiondci", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- the happy path
def test_dataset_layout(dataset, sample):
    rows = read_manifest(dataset)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert rows and meta["num_patches"] == len(rows)
    assert set(meta["classes"].values()) == {"background", "benign", "malignant"}
    for row in rows:
        image = np.asarray(Image.open(dataset / "images" / f"{row['id']}.png"))
        mask = np.asarray(Image.open(dataset / "masks" / f"{row['id']}.png"))
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 1, 2}
        fractions = np.bincount(mask.ravel(), minlength=3) / mask.size
        assert abs(fractions[2] - float(row["frac_malignant"])) < 1e-3
    # one group never spans two splits
    split_of_group = {}
    for row in rows:
        assert split_of_group.setdefault(row["group"], row["split"]) == row["split"]
    assert len({r["split"] for r in rows}) >= 2
    assert sorted(p.name for p in (dataset / "thumbnails").iterdir())
    assert meta["color_norm"]["enabled"] and meta["color_norm"]["slide_targets"]
    assert not dataset.with_name(dataset.name + ".partial").exists()


def test_geojson_slide_matches_truth(dataset, sample):
    """Patch masks of the slide annotated by GeoJSON agree with its ground-truth label image."""
    stems = {p.stem for p in (sample / "slides").glob("*.geojson")}
    assert stems
    rows = [r for r in read_manifest(dataset) if r["slide"] in stems]
    assert rows
    agree = []
    for row in rows:
        truth = np.asarray(Image.open(sample / "truth" / f"{row['slide']}_mask.png"))
        x, y, roi = int(row["x"]), int(row["y"]), int(row["roi_size"])
        expected = np.asarray(Image.fromarray(truth[y:y + roi, x:x + roi]).resize((64, 64), Image.NEAREST))
        got = np.asarray(Image.open(dataset / "masks" / f"{row['id']}.png"))
        agree.append((expected == got).mean())
    assert np.mean(agree) > 0.97


def test_rerun_is_a_noop_and_other_dataset_is_refused(dataset, sample):
    messages = []
    prepare_dataset(sample / "slides", dataset, tiny_cfg(), groups_csv=sample / "slides" / "groups.csv",
                    log=messages.append)
    assert "already holds this dataset" in messages[0]
    with pytest.raises(UserInputError, match="different dataset"):
        prepare_dataset(sample / "slides", dataset, tiny_cfg(patch_size=32), log=lambda m: None)


def test_interrupted_run_resumes_without_duplicates(sample, dataset, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = prepare_mod._extract_slide
    calls = {"n": 0}

    def flaky(job, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second slide
        return real(job, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_extract_slide", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(sample / "slides", out, tiny_cfg(), groups_csv=sample / "slides" / "groups.csv",
                        log=lambda m: None)
    assert not out.exists() and out.with_name("resumed.partial").is_dir()
    finished_first = list((out.with_name("resumed.partial") / "state").glob("*.rows.json"))
    assert len(finished_first) == 1
    monkeypatch.setattr(prepare_mod, "_extract_slide", real)
    prepare_dataset(sample / "slides", out, tiny_cfg(), groups_csv=sample / "slides" / "groups.csv",
                    log=lambda m: None)
    rows, reference = read_manifest(out), read_manifest(dataset)
    assert len({r["id"] for r in rows}) == len(rows)
    assert rows == reference
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in (dataset / "images").iterdir()
    )


def test_color_norm_reduces_tile_differences(sample, tmp_path):
    """Patches of a cast slide are closer to patches of its clean version after normalisation."""
    slides = tmp_path / "slides"
    slides.mkdir()
    stem = "phantom_001"
    shutil.copy(sample / "slides" / f"{stem}.png", slides)
    shutil.copy(sample / "slides" / f"{stem}_mask.png", slides)
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(sample / "clean" / f"{stem}.png", clean / f"{stem}.png")
    shutil.copy(sample / "slides" / f"{stem}_mask.png", clean)
    cfg = dict(val_fraction=0.0, test_fraction=0.0)
    off = prepare_dataset(slides, tmp_path / "off", tiny_cfg(color_norm=False, **cfg), log=lambda m: None)
    on = prepare_dataset(slides, tmp_path / "on", tiny_cfg(**cfg), log=lambda m: None)
    ref = prepare_dataset(clean, tmp_path / "ref", tiny_cfg(color_norm=False, **cfg), log=lambda m: None)

    def patch_means(ds):
        return np.stack([np.asarray(Image.open(p)).reshape(-1, 3).mean(0)
                         for p in sorted((ds / "images").iterdir())])

    # between-patch spread of mean colour: casts add spread, normalisation removes most of it
    spread = {k: patch_means(d).std(0).mean() for k, d in {"off": off, "on": on, "ref": ref}.items()}
    assert abs(spread["on"] - spread["ref"]) < abs(spread["off"] - spread["ref"])


# --------------------------------------------------------------------------- groups / GlaS
def test_groups_csv_in_glas_format(sample, tmp_path):
    groups = tmp_path / "manifest.csv"
    stems = sorted(p.stem for p in (sample / "slides").iterdir() if p.suffix in (".png", ".tif")
                   and not p.stem.endswith("_mask"))
    groups.write_text("name,patient_id,grade\n" + "".join(f"{s},P{i % 2},benign\n" for i, s in enumerate(stems)))
    out = prepare_dataset(sample / "slides", tmp_path / "ds", tiny_cfg(val_fraction=0.0, test_fraction=0.4),
                          groups_csv=groups, log=lambda m: None)
    rows = read_manifest(out)
    assert {r["group"] for r in rows} == {"P0", "P1"}
    assert len({(r["group"], r["split"]) for r in rows}) == 2


@pytest.mark.skipif(not GLAS.is_dir(), reason="../shared/data/glas not present")
def test_glas_subset_patient_split(tmp_path):
    with (GLAS / "manifest.csv").open() as fh:
        manifest = list(csv.DictReader(fh))
    by_patient: dict[str, list[str]] = {}
    for row in manifest:
        by_patient.setdefault(row["patient_id"], []).append(row["name"])
    chosen = [names[:2] for names in list(by_patient.values())[:3]]
    images = tmp_path / "images"
    images.mkdir()
    for names in chosen:
        for name in names:
            (images / f"{name}.png").symlink_to(GLAS / "images" / f"{name}.png")
    out = prepare_dataset(
        images, tmp_path / "glas", tiny_cfg(tile_size=1024, norm_target="dataset", val_fraction=0.3,
                                            test_fraction=0.3),
        masks_dir=GLAS / "masks", groups_csv=GLAS / "manifest.csv", log=lambda m: None,
    )
    rows = read_manifest(out)
    assert len({r["slide"] for r in rows}) == 6
    patient_splits = {}
    for r in rows:
        assert patient_splits.setdefault(r["group"], r["split"]) == r["split"]
    assert len(set(patient_splits.values())) == 3
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["color_norm"]["target_mode"] == "dataset" and meta["color_norm"]["target"]


# --------------------------------------------------------------------------- import-patches
def test_import_patches_round_trip(dataset, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["import-patches", dataset, "--out", tmp_path / "imp"], monkeypatch, capsys)
    assert code == 0, err
    rows = read_manifest(tmp_path / "imp")
    assert len(rows) == len(read_manifest(dataset))
    first = rows[0]["id"]
    assert (tmp_path / "imp" / "images" / f"{first}.png").read_bytes() == (
        dataset / "images" / f"{first}.png").read_bytes()


def test_import_patches_rejects_mixed_sizes(dataset, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(dataset / "images", src / "images")
    shutil.copytree(dataset / "masks", src / "masks")
    odd = sorted((src / "images").iterdir())[1]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(odd)
    code, _, err = run_cli(["import-patches", src, "--out", tmp_path / "imp"], monkeypatch, capsys)
    assert code == 2 and odd.name in err and "one size" in err and "Traceback" not in err


# --------------------------------------------------------------------------- bad input via the CLI
@pytest.fixture()
def one_slide(sample, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sample / "slides" / "phantom_001.png", folder / "s.png")
    shutil.copy(sample / "slides" / "phantom_001_mask.png", folder / "s_mask.png")
    return folder


def _expect_error(args, monkeypatch, capsys, *needles):
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_error_empty_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(["prepare", tmp_path / "empty", "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "no slide images")


def test_error_truncated_image(one_slide, tmp_path, monkeypatch, capsys):
    data = (one_slide / "s.png").read_bytes()
    (one_slide / "s.png").write_bytes(data[: len(data) // 3])
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "s.png")
    assert not (tmp_path / "o").exists()


def test_error_mask_size(one_slide, tmp_path, monkeypatch, capsys):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(one_slide / "s_mask.png")
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "s_mask.png")


def test_error_mask_labels(one_slide, tmp_path, monkeypatch, capsys):
    mask = np.asarray(Image.open(one_slide / "s_mask.png")).copy()
    mask[:50, :50] = 7
    Image.fromarray(mask).save(one_slide / "s_mask.png")
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "s_mask.png", "7")
    assert not (tmp_path / "o").exists()


def test_error_unknown_geojson_class(one_slide, tmp_path, monkeypatch, capsys):
    (one_slide / "s_mask.png").unlink()
    square = [[[10, 10], [200, 10], [200, 200], [10, 200], [10, 10]]]
    (one_slide / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"classification": {"name": "Stroma"}}}]}))
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "Stroma", "--class-map")
    mapping = tmp_path / "classes.json"
    mapping.write_text(json.dumps({"Stroma": 1}))
    code, _, err = run_cli(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny",
                            "--class-map", mapping], monkeypatch, capsys)
    assert code == 0, err


def test_error_non_rgb(one_slide, tmp_path, monkeypatch, capsys):
    (one_slide / "s.png").unlink()
    tifffile.imwrite(one_slide / "s.tif", np.zeros((768, 768), np.uint8))
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny"],
                  monkeypatch, capsys, "s.tif", "RGB")


def test_error_pixel_limit(one_slide, tmp_path, monkeypatch, capsys):
    _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "tiny",
                   "--max-pixels", "1000"], monkeypatch, capsys, "s.png", "--max-pixels")


def test_error_out_holds_other_dataset(one_slide, dataset, monkeypatch, capsys):
    _expect_error(["prepare", one_slide, "--out", dataset, "--preset", "tiny"],
                  monkeypatch, capsys, "different dataset")


def test_every_command_has_help(monkeypatch, capsys):
    import typer

    from diffusiondci.cli import app

    commands = sorted(typer.main.get_command(app).commands)
    assert {"prepare", "train-dsdm", "train-seg", "segment", "rasterize", "evaluate-seg", "experiment",
            "report", "demo"} <= set(commands)
    for command in commands:
        code, out, _ = run_cli([command, "--help"], monkeypatch, capsys)
        assert code == 0 and "--out" in out, command


# --------------------------------------------------------------------------- optimised path = reference
def _reference_patches(rgb: np.ndarray, roi: int, stride: int, patch: int, tile: int, min_tissue: float):
    """The straightforward computation the threaded, chunked, group-wise path must reproduce: the
    whole slide in memory, kornia's CIELAB, per-tile Reinhard statistics and transfer with the soft
    tissue weight (defaults of TissueConfig), then each ROI cropped (zero-padded) and box-resized."""
    import torch
    from kornia.color import lab_to_rgb, rgb_to_lab

    from diffusiondci.data.tiling import roi_grid

    def lab_of(image):
        return rgb_to_lab(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255)

    def soft_weight(lab):
        L, chroma = lab[0], torch.hypot(lab[1], lab[2])
        dark_ok = ((L - 10) / 6 + 0.5).clamp(0, 1)
        bright = ((L - 85) / 6 + 0.5).clamp(0, 1)
        grey = ((12 - chroma) / 6 + 0.5).clamp(0, 1)
        return dark_ok * (1 - bright * grey)

    def hard_mask(lab):
        return (lab[0] > 10) & ~((lab[0] >= 85) & (torch.hypot(lab[1], lab[2]) <= 12))

    h, w = rgb.shape[:2]
    stats = {}
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            part = rgb[y:y + tile, x:x + tile]
            lab = lab_of(part[::4, ::4])
            m = hard_mask(lab)
            if int(m.sum()) >= 100:
                px = lab[:, m].double()
                n = round(int(m.sum()) * part.shape[0] * part.shape[1] / (lab.shape[1] * lab.shape[2]))
                stats[(y, x)] = (px.mean(1).numpy(), px.std(1, correction=0).numpy(), n)
    n_all = np.array([s[2] for s in stats.values()], float)
    t_mean = sum(s[0] * k for s, k in zip(stats.values(), n_all)) / n_all.sum()
    t_std = sum(s[1] * k for s, k in zip(stats.values(), n_all)) / n_all.sum()
    out = rgb.copy()
    for (y, x), (mean, std, _) in stats.items():
        part = rgb[y:y + tile, x:x + tile]
        gain = np.clip(t_std / np.maximum(std, 1.0), 0.25, 4.0)
        offset = t_mean - gain * mean
        lab = lab_of(part)
        new = lab * torch.tensor(gain, dtype=torch.float32).view(3, 1, 1) + torch.tensor(
            offset, dtype=torch.float32).view(3, 1, 1)
        new[0].clamp_(0, 100)
        new = lab_to_rgb(new, clip=True)
        old = torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1).float() / 255
        blended = old + soft_weight(lab) * (new - old)
        out[y:y + tile, x:x + tile] = blended.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    patches = {}
    for x, y in roi_grid(h, w, roi, stride, "shift"):
        def crop(image):
            padded = np.zeros((roi, roi, 3), np.uint8)
            piece = image[y:y + roi, x:x + roi]
            padded[:piece.shape[0], :piece.shape[1]] = piece
            return np.array(Image.fromarray(padded).resize((patch, patch), Image.Resampling.BOX))
        if float(hard_mask(lab_of(crop(rgb))).float().mean()) >= min_tissue:
            patches[f"s_x{x}_y{y}"] = crop(out)
    return patches


def test_optimised_path_matches_reference(tmp_path, monkeypatch):
    """Tiled-TIFF reads, numpy CIELAB, chunks, threads and overlapping ROIs normalised once give the
    patches of the straightforward computation: equal up to float32 rounding (at most 1/255)."""
    from diffusiondci.data import parallel
    from diffusiondci.data.phantom import generate_slide

    slide = generate_slide((600, 610), tile_size=128, seed=11)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "s.tif", slide.rgb, photometric="rgb", tile=(64, 64), compression="zlib")
    Image.fromarray(slide.mask).save(folder / "s_mask.png")
    monkeypatch.setattr(parallel, "default_workers", lambda: 3)  # threads even on one CPU
    monkeypatch.setattr(prepare_mod, "default_workers", lambda: 3)
    # stride = ROI: the border ("shift") windows overlap the last regular ones and are cut together
    cfg = tiny_cfg(roi_size=192, stride=192, patch_size=64, tile_size=128, val_fraction=0.0, test_fraction=0.0)
    assert prepare_mod._clusters([0, 192, 384, 408], 192) == [[0], [192], [384, 408]]
    out = prepare_dataset(folder, tmp_path / "ds", cfg, log=lambda m: None)
    reference = _reference_patches(slide.rgb, 192, 192, 64, 128, cfg.min_tissue)
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == list(reference)  # same ROIs kept, in the grid's order
    values = differing = 0
    for row in rows:
        got = np.asarray(Image.open(out / "images" / f"{row['id']}.png")).astype(int)
        diff = np.abs(got - reference[row["id"]])
        assert diff.max() <= 1, row["id"]
        values, differing = values + diff.size, differing + int((diff > 0).sum())
        mask = np.asarray(Image.open(out / "masks" / f"{row['id']}.png"))
        x, y = int(row["x"]), int(row["y"])
        padded = np.zeros((192, 192), np.uint8)
        piece = slide.mask[y:y + 192, x:x + 192]
        padded[:piece.shape[0], :piece.shape[1]] = piece
        np.testing.assert_array_equal(mask, np.asarray(Image.fromarray(padded).resize((64, 64), Image.Resampling.NEAREST)))
    print(f"{differing} of {values} patch values differ (by 1)")
    assert differing / values < 1e-3, f"{differing} of {values} values differ (by 1)"


# --------------------------------------------------------------------------- checked up front
def _slides_folder(sample, tmp_path, n=3) -> Path:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        shutil.copy(sample / "slides" / "phantom_001.png", folder / f"s{i}.png")
        shutil.copy(sample / "slides" / "phantom_001_mask.png", folder / f"s{i}_mask.png")
    return folder


@pytest.mark.parametrize("content", [
    {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[9, 9], [90, 9], [90, 90], [9, 9]]]},
         "properties": {"classification": {"name": "Necrosis"}}}]},
    "{not json",
], ids=["unknown-class", "malformed"])
def test_bad_geojson_of_last_slide_stops_before_any_cutting(sample, tmp_path, monkeypatch, capsys, content):
    folder = _slides_folder(sample, tmp_path)
    (folder / "s2_mask.png").unlink()
    (folder / "s2.geojson").write_text(content if isinstance(content, str) else json.dumps(content))

    def never(*args, **kwargs):
        raise AssertionError("a slide was read before the inputs were checked")

    monkeypatch.setattr(prepare_mod, "_collect_stats", never)
    monkeypatch.setattr(prepare_mod, "_extract_slide", never)
    out = tmp_path / "o"
    _expect_error(["prepare", folder, "--out", out, "--preset", "tiny"], monkeypatch, capsys, "s2.geojson")
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_bad_options_are_one_line_errors(one_slide, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["prepare", one_slide, "--preset", "tiny", "--out"]
    _expect_error([*base, a_file], monkeypatch, capsys, "a_file", "is a file", "--out")
    _expect_error([*base, tmp_path / "o", "--edge", "foo"], monkeypatch, capsys, "--edge", "'foo'", "shift")
    _expect_error([*base, tmp_path / "o", "--val-fraction", "0.6", "--test-fraction", "0.5"],
                  monkeypatch, capsys, "--val-fraction", "--test-fraction")
    _expect_error([*base, tmp_path / "o", "--min-tissue", "2"], monkeypatch, capsys, "--min-tissue")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- suspicious geometry
def test_annotations_outside_the_slide_are_reported(one_slide, tmp_path, monkeypatch, capsys):
    (one_slide / "s_mask.png").unlink()
    far = [[[2000, 2100], [3000, 2100], [3000, 2900], [2000, 2900], [2000, 2100]]]  # slide is 768 px
    (one_slide / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": far},
         "properties": {"classification": {"name": "Tumor"}}}]}))
    with pytest.warns(UserWarning, match=r"s\.geojson: none of the annotated area lies inside the slide.*"
                                         r"x 2000\.\.3000, y 2100\.\.2900 px but the slide is 768x768 px"):
        prepare_dataset(one_slide, tmp_path / "o", tiny_cfg(), log=lambda m: None)
    code, _, err = run_cli(["prepare", one_slide, "--out", tmp_path / "o2", "--preset", "tiny"], monkeypatch, capsys)
    assert code == 0 and err.startswith("warning: ") and "s.geojson" in err and "768x768" in err, err


def test_patch_larger_than_roi_warns(one_slide, tmp_path):
    with pytest.warns(UserWarning, match=r"--patch-size 96 is larger than --roi-size 64: every ROI is upsampled 1\.50x"):
        prepare_dataset(one_slide, tmp_path / "o", tiny_cfg(roi_size=64, stride=64, patch_size=96), log=lambda m: None)


def test_roi_larger_than_the_slides(one_slide, sample, tmp_path, monkeypatch, capsys):
    # every slide smaller than the ROI (the paper preset on small images): an error, nothing written
    err = _expect_error(["prepare", one_slide, "--out", tmp_path / "o", "--preset", "paper"], monkeypatch, capsys,
                        "the ROI (3450 px, --roi-size) is larger than every slide", "768x768")
    assert not (tmp_path / "o").exists(), err
    # one slide smaller than the ROI among larger ones: a warning naming it and both sizes
    small = np.asarray(Image.open(one_slide / "s.png"))[:150, :180]
    Image.fromarray(small).save(one_slide / "t.png")
    Image.fromarray(np.zeros((150, 180), np.uint8)).save(one_slide / "t_mask.png")
    with pytest.warns(UserWarning, match=r"t\.png: the slide is 180x150 px \(width x height\), smaller than "
                                         r"the ROI \(192 px, --roi-size\); its patches are padded"):
        prepare_dataset(one_slide, tmp_path / "o", tiny_cfg(), log=lambda m: None)
