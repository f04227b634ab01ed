"""Label-efficient mode: slides / patches without masks in `prepare`, `import-patches`, `PatchDataset`,
`train-encoder` and `train-dsdm` (unlabelled images train DSDM with the NULL mask condition)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusiondci.config import build, load_section
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.data.phantom import write_sample
from diffusiondci.data.prepare import PrepareConfig, prepare_dataset
from diffusiondci.data.splits import assign_splits
from diffusiondci.diffusion.losses import hybrid_loss
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.errors import UserInputError
from diffusiondci.models.conditions import mask_one_hot
from diffusiondci.models.unet import DSDMUNet
from diffusiondci.train.dsdm import build_unet_config, dsdm_loss, train_dsdm, training_conditions
from tests.test_dsdm import micro_config
from tests.test_prepare import run_cli

# phantom_000, 001 annotated; 002, 003 unlabelled. 002 shares patient A with 000, 003 patient B with 001.
GROUPS = {"phantom_000": "A", "phantom_001": "B", "phantom_002": "A", "phantom_003": "B"}
UNLABELLED = ("phantom_002", "phantom_003")
NO_DROP = dict(p_drop_mask=0.0, p_drop_ref=0.0, p_drop_both=0.0)


def split_seed() -> int:
    """A split seed that puts patient A in train and patient B in test (val/test 0.2 of 2 groups)."""
    for seed in range(100):
        split = assign_splits(GROUPS.values(), 0.2, 0.2, seed)
        if (split["A"], split["B"]) == ("train", "test"):
            return seed
    raise AssertionError("no such seed")


def manifest(ds: Path) -> list[dict]:
    with (ds / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Folders: ``all`` (every slide annotated), ``labelled`` (000, 001) + ``extra`` (002, 003, no
    annotation), ``partial`` (all slides, 002 and 003 without annotation)."""
    root = tmp_path_factory.mktemp("unlabelled")
    sample = write_sample(root / "sample", n_slides=4, seed=2, size=(288, 288), tile_size=96, geojson_slides=())
    groups = root / "groups.csv"
    groups.write_text("slide,group\n" + "".join(f"{s},{g}\n" for s, g in GROUPS.items()))
    folders = {k: root / k for k in ("all", "labelled", "extra", "partial")}
    for f in folders.values():
        f.mkdir()
    for stem in sample.stems:
        for name in (sample.slides[stem], sample.masks[stem]):
            shutil.copy(name, folders["all"])
            if stem not in UNLABELLED or name == sample.slides[stem]:
                shutil.copy(name, folders["partial"])
        target = folders["extra"] if stem in UNLABELLED else folders["labelled"]
        shutil.copy(sample.slides[stem], target)
        if stem not in UNLABELLED:
            shutil.copy(sample.masks[stem], target)
    return {**folders, "groups": groups}


def cfg(**kw) -> PrepareConfig:
    return build(PrepareConfig, load_section("tiny", "prepare"), tile_size=96, patch_size=32, seed=split_seed(), **kw)


@pytest.fixture(scope="module")
def mixed(slides, tmp_path_factory) -> Path:
    """`prepare --unlabelled` through the CLI."""
    out = tmp_path_factory.mktemp("mixed") / "ds"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["diffusiondci", "prepare", str(slides["labelled"]), "--out", str(out),
                                 "--preset", "tiny", "--tile-size", "96", "--patch-size", "32",
                                 "--seed", str(split_seed()),
                                 "--groups", str(slides["groups"]), "--unlabelled", str(slides["extra"])])
        from diffusiondci import cli

        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code in (0, None)
    finally:
        mp.undo()
    return out


def test_prepare_unlabelled_folder(mixed):
    rows = manifest(mixed)
    meta = json.loads((mixed / "dataset.json").read_text())
    unlabelled = [r for r in rows if r["labelled"] == "0"]
    assert {r["slide"] for r in unlabelled} == set(UNLABELLED)
    assert all(r["labelled"] == "1" for r in rows if r["slide"] not in UNLABELLED)
    assert meta["num_unlabelled"] == len(unlabelled) > 0
    for r in rows:
        assert (mixed / "images" / f"{r['id']}.png").is_file()
        assert (mixed / "masks" / f"{r['id']}.png").is_file() == (r["labelled"] == "1")
    assert all(r["frac_benign"] == "" for r in unlabelled)
    # split by patient like any slide: 003 trains with patient A, 004 is held out with patient B
    split = {r["slide"]: r["split"] for r in rows}
    assert split["phantom_002"] == split["phantom_000"] == "train"
    assert split["phantom_003"] == split["phantom_001"] == "test"
    train_ids = set(PatchDataset(mixed, splits="train", labelled_only=False).ids)
    assert not any(r["id"] in train_ids for r in rows if r["slide"] == "phantom_003")
    slides_meta = {s["stem"]: s for s in meta["source"]["slides"]}
    assert slides_meta["phantom_002"]["annotation"] is None and not slides_meta["phantom_002"]["labelled"]


def test_prepare_allow_unlabelled_matches(slides, mixed, tmp_path):
    # without the flag a missing annotation is an error that names the flag
    with pytest.raises(UserInputError, match="--allow-unlabelled"):
        prepare_dataset(slides["partial"], tmp_path / "x", cfg(), groups_csv=slides["groups"], log=lambda m: None)
    with pytest.raises(UserInputError, match="two slides named 'phantom_002'"):
        prepare_dataset(slides["all"], tmp_path / "x", cfg(), unlabelled_dir=slides["extra"], log=lambda m: None)
    partial = prepare_dataset(slides["partial"], tmp_path / "p", cfg(), groups_csv=slides["groups"],
                              allow_unlabelled=True, log=lambda m: None)
    assert manifest(partial) == manifest(mixed)
    assert sorted(p.name for p in (partial / "masks").iterdir()) == sorted(p.name for p in (mixed / "masks").iterdir())
    # unlabelled slides are cut and colour-normalised exactly like annotated ones
    full = prepare_dataset(slides["all"], tmp_path / "all", cfg(), groups_csv=slides["groups"], log=lambda m: None)
    full_rows = {r["id"]: r for r in manifest(full)}
    for r in manifest(partial):
        assert {k: v for k, v in r.items() if not k.startswith("frac") and k != "labelled"} == {
            k: v for k, v in full_rows[r["id"]].items() if not k.startswith("frac") and k != "labelled"}
        assert (partial / "images" / f"{r['id']}.png").read_bytes() == (full / "images" / f"{r['id']}.png").read_bytes()


def test_import_patches_allow_unlabelled(mixed, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(mixed / "images", src / "images")
    shutil.copytree(mixed / "masks", src / "masks")
    missing = [r["id"] for r in manifest(mixed) if r["labelled"] == "0"]
    code, _, err = run_cli(["import-patches", src, "--out", tmp_path / "no"], monkeypatch, capsys)
    assert code == 2 and "--allow-unlabelled" in err
    code, _, err = run_cli(["import-patches", src, "--out", tmp_path / "imp", "--allow-unlabelled"],
                           monkeypatch, capsys)
    assert code == 0, err
    rows = {r["id"]: r for r in manifest(tmp_path / "imp")}
    assert {i for i, r in rows.items() if r["labelled"] == "0"} == set(missing)
    assert {p.stem for p in (tmp_path / "imp" / "masks").iterdir()} == set(rows) - set(missing)
    # no masks/ folder at all: every image is unlabelled
    shutil.rmtree(src / "masks")
    code, _, err = run_cli(["import-patches", src, "--out", tmp_path / "bare", "--allow-unlabelled"],
                           monkeypatch, capsys)
    assert code == 0, err
    assert all(r["labelled"] == "0" for r in manifest(tmp_path / "bare"))


def test_patch_dataset_semantics(mixed, tmp_path):
    ds = shutil.copytree(mixed, tmp_path / "ds")
    rows = [r for r in manifest(ds) if r["split"] == "train"]
    n_unlabelled = sum(r["labelled"] == "0" for r in rows)
    assert 0 < n_unlabelled < len(rows)
    assert len(PatchDataset(ds)) == len(rows) - n_unlabelled  # labelled_only stays the default
    for r in rows:  # garbage where an unlabelled patch's mask would be: never read
        if r["labelled"] == "0":
            (ds / "masks" / f"{r['id']}.png").write_bytes(b"not a png")
    every = PatchDataset(ds, labelled_only=False)
    assert every.labelled == [r["labelled"] == "1" for r in rows] and every.num_labelled == len(rows) - n_unlabelled
    for i, r in enumerate(rows):
        item = every[i]
        assert item["labelled"] is (r["labelled"] == "1") and item["mask"].dtype == torch.int64
        if item["labelled"]:
            truth = np.asarray(Image.open(ds / "masks" / f"{r['id']}.png"))
            assert torch.equal(item["mask"], torch.from_numpy(truth.astype(np.int64)))
        else:
            assert every.mask_path(i) is None
            assert item["mask"].shape == item["image"].shape[1:] and not item["mask"].any()
    assert all("mask" not in PatchDataset(ds, labelled_only=False, with_masks=False)[i] for i in range(2))


def test_null_mask_for_unlabelled_samples():
    torch.manual_seed(0)
    net = DSDMUNet(build_unet_config(micro_config(), image_size=32, ref_dim=512))
    with torch.no_grad():  # away from the zero-initialised layers so the mask matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DiffusionSchedule(1000)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    mask = torch.randint(0, 3, (4, 32, 32))
    ref, noise, t = torch.randn(4, 512), torch.randn(4, 3, 32, 32), torch.tensor([5, 100, 500, 900])
    labelled = torch.tensor([True, False, True, False])

    mixed, keep = training_conditions(net, x0, mask, ref, labelled=labelled)
    assert torch.equal(mixed["mask"][labelled], mask_one_hot(mask)[labelled])
    assert not mixed["mask"][~labelled].any()  # the model's NULL mask (zeros, eq. 17)
    assert keep["mask"].tolist() == labelled.tolist() and keep["ref"].all()
    # the random draws do not depend on the labels: dropouts and generator state as without them
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, keep_all = training_conditions(net, x0, mask, ref, (0.3, 0.3, 0.3), g1)
    _, keep_some = training_conditions(net, x0, mask, ref, (0.3, 0.3, 0.3), g2, labelled=labelled)
    assert torch.equal(keep_some["ref"], keep_all["ref"])
    assert torch.equal(keep_some["mask"], keep_all["mask"] & labelled)
    assert torch.equal(g1.get_state(), g2.get_state())

    with torch.no_grad():
        x_t = sched.q_sample(x0, t, noise)
        expected_mask = mask_one_hot(mask) * labelled.float().view(4, 1, 1, 1)
        expected = hybrid_loss(sched, net(x_t, t, mask=expected_mask, ref=ref), x0, x_t, t, noise, reduction="mean")
        got = dsdm_loss(net, sched, x0, mask, ref, t, noise, labelled=labelled)
        assert torch.allclose(got["loss"], expected["loss"]) and float(got["kept_mask"]) == 0.5
        # all labelled: exactly the old loss
        plain = dsdm_loss(net, sched, x0, mask, ref, t, noise)["loss"]
        all_true = torch.ones(4, dtype=torch.bool)
        assert torch.equal(dsdm_loss(net, sched, x0, mask, ref, t, noise, labelled=all_true)["loss"], plain)
        assert abs(float(plain) - float(got["loss"])) > 1e-5


@pytest.fixture(scope="module")
def encoder_run(mixed, tmp_path_factory) -> Path:
    """An (untrained) encoder in the run-folder layout, with its embedding cache: enough for DSDM."""
    from diffusiondci.models.reference_encoder import ReferenceEncoder, save_encoder
    from diffusiondci.train.encoder import ENCODER_DIR, write_embeddings

    run = tmp_path_factory.mktemp("enc") / "enc"
    torch.manual_seed(0)
    encoder = ReferenceEncoder(embed_dim=512, width=0.25).eval()
    save_encoder(encoder, run / ENCODER_DIR, {"data": str(mixed)})
    write_embeddings(encoder, mixed, run)
    return run


def test_encoder_respects_the_flag(mixed, encoder_run, monkeypatch, tmp_path):
    from diffusiondci.train import encoder as enc_mod

    ids = json.loads((encoder_run / "embeddings.json").read_text())["ids"]
    assert set(ids) == {r["id"] for r in manifest(mixed)}  # the cache covers unlabelled patches
    sizes = {}

    class Spy(PatchDataset):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sizes[kw["labelled_only"]] = len(self)
            raise KeyboardInterrupt

    monkeypatch.setattr(enc_mod, "PatchDataset", Spy)
    for flag in (True, False):
        with pytest.raises(KeyboardInterrupt):
            enc_mod.train_encoder(mixed, tmp_path / str(flag), build(
                enc_mod.EncoderConfig, load_section("tiny", "encoder"), use_unlabelled=flag), progress=False)
    train = [r for r in manifest(mixed) if r["split"] == "train"]
    assert sizes == {False: len(train), True: sum(r["labelled"] == "1" for r in train)}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = run / "checkpoints" / "latest"
    return {f"{n}/{k}": v for n in ("model", "ema") for k, v in load_file(str(latest / f"{n}.safetensors")).items()}


def test_dsdm_trains_on_unlabelled_and_never_reads_their_masks(mixed, encoder_run, tmp_path):
    ds = shutil.copytree(mixed, tmp_path / "ds")
    train = [r for r in manifest(ds) if r["split"] == "train"]
    n_lab = sum(r["labelled"] == "1" for r in train)
    kw = dict(batch_size=4, steps=2, ckpt_every=2, **NO_DROP)
    clean = train_dsdm(ds, tmp_path / "clean", micro_config(**kw), encoder_run=encoder_run, progress=False,
                       device="cpu")
    record = json.loads((clean / "dsdm.json").read_text())["data"]
    assert (record["num_labelled_train_patches"], record["num_unlabelled_train_patches"]) == (n_lab, len(train) - n_lab)
    # no dropouts: kept_mask = labelled share of the batch, so < 1 shows a mixed batch got NULL masks
    kept = [float(r["kept_mask"]) for r in csv.DictReader((clean / "log.csv").open())]
    assert any(0 < k < 1 for k in kept), kept

    # poison: garbage (unreadable) and a plausible all-malignant mask where unlabelled masks would be
    for i, r in enumerate(r for r in train if r["labelled"] == "0"):
        path = ds / "masks" / f"{r['id']}.png"
        if i % 2:
            path.write_bytes(b"\x89PNG garbage")
        else:
            Image.fromarray(np.full((32, 32), 2, np.uint8)).save(path)
    # interrupted after one step and resumed: still bit-identical to the clean, uninterrupted run
    part = train_dsdm(ds, tmp_path / "part", micro_config(**{**kw, "steps": 1}), encoder_run=encoder_run,
                      progress=False, device="cpu")
    train_dsdm(ds, part, micro_config(**kw), encoder_run=encoder_run, resume=True, progress=False, device="cpu")
    a, b = _weights(clean), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    only = train_dsdm(ds, tmp_path / "only", micro_config(**{**kw, "steps": 1}, use_unlabelled=False),
                      encoder_run=encoder_run, progress=False, device="cpu")
    record = json.loads((only / "dsdm.json").read_text())["data"]
    assert (record["num_labelled_train_patches"], record["num_unlabelled_train_patches"]) == (n_lab, 0)
    assert [float(r["kept_mask"]) for r in csv.DictReader((only / "log.csv").open())] == [1.0]
