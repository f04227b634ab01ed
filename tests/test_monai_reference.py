"""The MONAI reference U-Net (`diffusiondci.train.monai_reference`): budgets, validation choice, scoring."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from diffusiondci.train.monai_reference import train_reference
from tests.test_dsdm import build_inputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_inputs(tmp_path_factory.getbasetemp() / "dsdm_shared")["data"]


def test_steps_budget_best_checkpoint_and_tta(data):
    record, scores, net = train_reference(data, None, seed=0, steps=4, val_every=2, batch_size=4, tta="flip")
    assert record["steps"] == 4 and record["val_dice"] is not None
    assert record["tta"]["mode"] == "flip" and scores["tta"] == "flip"
    # the returned scores are the TTA scoring's, the record keeps the single-view one too
    assert scores["dataset"]["mean_dice"] == record["tta"]["dataset_dice"]
    assert 0.0 <= record["dataset_dice"] <= 1.0 and not net.training
    # same seed, same steps: the same network
    again, _, net2 = train_reference(data, None, seed=0, steps=4, val_every=2, batch_size=4)
    assert again["mean_dice"] == record["mean_dice"]
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


def test_without_validation_patches_the_last_network_is_kept(data, tmp_path):
    """A dataset with no validation split (a user who keeps no annotated slide aside) trains to the end."""
    copy = tmp_path / "noval"
    shutil.copytree(data, copy, symlinks=True)
    with (copy / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r["split"] == "val" for r in rows)
    for r in rows:
        r["split"] = "train" if r["split"] == "val" else r["split"]
    with (copy / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    record, scores, _ = train_reference(copy, None, seed=1, steps=3, val_every=1, batch_size=4)
    assert record["steps"] == 3 and record["val_dice"] is None and scores["steps"] == 3
    with pytest.raises(ValueError, match="steps and/or seconds"):
        train_reference(copy, None, seed=1)
