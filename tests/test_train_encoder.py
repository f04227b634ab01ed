"""The `train-encoder` stage: a SimCLR run folder, the encoder, the embedding cache, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusiondci.config import build, load_section
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.data.phantom import write_sample
from diffusiondci.data.prepare import PrepareConfig, prepare_dataset
from diffusiondci.errors import UserInputError
from diffusiondci.train.encoder import EncoderConfig, load_embeddings, load_encoder_run, train_encoder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("enc")
    write_sample(root / "sample", seed=1)
    cfg = build(PrepareConfig, load_section("tiny", "prepare"))
    return prepare_dataset(root / "sample" / "slides", root / "ds", cfg,
                           groups_csv=root / "sample" / "slides" / "groups.csv", log=lambda m: None)


def tiny(**kw) -> EncoderConfig:
    return build(EncoderConfig, load_section("tiny", "encoder"), **kw)


def test_patch_dataset_items(dataset):
    ds = PatchDataset(dataset, splits=("train",))
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (64, 64)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2}
    with pytest.raises(UserInputError):
        PatchDataset(dataset, splits=("training",))
    with pytest.raises(UserInputError, match="not a patch dataset"):
        PatchDataset(dataset / "images")


def test_train_encoder_run_and_cache(dataset, tmp_path):
    run = train_encoder(dataset, tmp_path / "run", tiny(steps=6, ckpt_every=3, log_every=2), progress=False)
    encoder, meta = load_encoder_run(run)
    emb = load_embeddings(run)
    every = PatchDataset(dataset, splits=None, labelled_only=False)
    assert set(emb) == set(every.ids)
    first = every[0]
    with torch.no_grad():
        direct = encoder(first["image"][None])[0]
    assert torch.allclose(direct, emb[first["id"]], atol=1e-4)
    assert (run / "log.csv").is_file() and json.loads((run / "config.json").read_text())["stage"] == "encoder"


def test_train_encoder_resume_matches_uninterrupted(dataset, tmp_path):
    cpu = dict(progress=False, device="cpu")  # bit-exact on the CPU (cuDNN kernels are not deterministic)
    full = train_encoder(dataset, tmp_path / "full", tiny(steps=6, ckpt_every=3, log_every=1), **cpu)
    part = train_encoder(dataset, tmp_path / "part", tiny(steps=3, ckpt_every=3, log_every=1), **cpu)
    # "killed" after 3 steps: resume the same run to 6 steps
    train_encoder(dataset, part, tiny(steps=6, ckpt_every=3, log_every=1), resume=True, **cpu)
    a = load_file(str(full / "encoder" / "encoder.safetensors"))
    b = load_file(str(part / "encoder" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_train_encoder_on_an_explicit_device(dataset, tmp_path):
    from typer.testing import CliRunner

    from diffusiondci.cli import app

    out = tmp_path / "enc_cli"
    result = CliRunner().invoke(app, ["train-encoder", str(dataset), "--out", str(out), "--preset", "tiny",
                                      "--steps", "1", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "embeddings.json").is_file()
    bad = CliRunner().invoke(app, ["train-encoder", str(dataset), "--out", str(tmp_path / "x"), "--preset", "tiny",
                                   "--steps", "1", "--device", "tpu"])
    assert isinstance(bad.exception, UserInputError) and "--device" in str(bad.exception)
