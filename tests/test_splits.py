"""Group splits: the plain seeded split and the stratified one (`prepare --stratify`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusiondci.data.phantom import write_sample
from diffusiondci.data.prepare import prepare_dataset
from diffusiondci.data.splits import (
    assign_splits,
    group_composition,
    split_imbalance,
    split_mix_line,
)
from diffusiondci.errors import UserInputError
from tests.test_prepare import read_manifest, run_cli, tiny_cfg

# 8 large malignant-only patients and 4 small benign-only ones: [patches, bg, benign, malignant]
COMPOSITION = {f"M{i}": [30, 15, 0, 15] for i in range(8)} | {f"B{i}": [10, 5, 5, 0] for i in range(4)}
FRACTIONS = {"val": 0.25, "test": 0.25}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, Path]:
    """(slides folder, prepared tiny dataset) of a generated sample."""
    root = tmp_path_factory.mktemp("splits")
    write_sample(root, seed=3)
    out = prepare_dataset(root / "slides", root / "dataset", tiny_cfg(), groups_csv=root / "slides" / "groups.csv",
                          log=lambda m: None)
    return root / "slides", out


def benign_in(split: dict[str, str], name: str) -> float:
    return sum(COMPOSITION[g][2] for g, s in split.items() if s == name)


def test_imbalance_closed_form():
    comp = {"A": [10, 5, 5, 0], "B": [10, 5, 0, 5]}
    # whole mix (bg, benign, malignant) = (.5, .25, .25); val = A = (.5, .5, 0): TV 0.25; share 0.5 as wanted
    assert split_imbalance({"A": "val", "B": "train"}, comp, {"val": 0.5}) == pytest.approx(0.25)
    # wanted share 0.25 instead: + |0.5 - 0.25|
    assert split_imbalance({"A": "val", "B": "train"}, comp, {"val": 0.25}) == pytest.approx(0.5)
    # a split with no wanted share is not scored
    assert split_imbalance({"A": "val", "B": "train"}, comp, {"val": 0.5, "test": 0.0}) == pytest.approx(0.25)


def test_first_candidate_is_the_plain_split():
    groups = list(COMPOSITION)
    for seed in range(10):
        plain = assign_splits(groups, 0.25, 0.25, seed)
        assert assign_splits(groups, 0.25, 0.25, seed, composition=COMPOSITION, candidates=1) == plain


def test_stratified_split_keeps_every_class_and_is_never_worse():
    groups = list(COMPOSITION)
    plain_missing = 0
    for seed in range(20):
        plain = assign_splits(groups, 0.25, 0.25, seed)
        strat = assign_splits(groups, 0.25, 0.25, seed, composition=COMPOSITION)
        plain_missing += benign_in(plain, "val") == 0 or benign_in(plain, "test") == 0
        assert benign_in(strat, "val") > 0 and benign_in(strat, "test") > 0, seed
        assert split_imbalance(strat, COMPOSITION, FRACTIONS) <= split_imbalance(plain, COMPOSITION, FRACTIONS)
        # same number of groups per split as the plain rule
        assert sorted(strat.values()) == sorted(plain.values())
        assert assign_splits(groups, 0.25, 0.25, seed, composition=COMPOSITION) == strat  # deterministic
    assert plain_missing > 0  # the plain split does lose the class at some seeds, so the check can fail


def test_missing_composition_is_an_error():
    with pytest.raises(ValueError, match="no composition"):
        assign_splits(["A", "B", "C"], 0.3, 0.3, 0, composition={"A": [1, 1, 0, 0]})
    with pytest.raises(UserInputError):
        assign_splits(["A", "B"], 0.6, 0.6, 0, composition={"A": [1, 1, 0, 0], "B": [1, 0, 1, 0]})


def test_group_composition_and_mix_line():
    rows = [
        {"group": "A", "split": "train", "frac_background": "0.5", "frac_benign": "0.5", "frac_malignant": "0"},
        {"group": "A", "split": "train", "frac_background": "", "frac_benign": "", "frac_malignant": ""},
        {"group": "B", "split": "val", "frac_background": "0.25", "frac_benign": "0", "frac_malignant": "0.75"},
    ]
    assert group_composition(rows, ("background", "benign", "malignant")) == {
        "A": [2.0, 0.5, 0.5, 0.0], "B": [1.0, 0.25, 0.0, 0.75]}
    line = split_mix_line(rows)
    assert "train 2 (50/50/0 %)" in line and "val 1 (25/0/75 %)" in line and "test" not in line


def test_import_patches_stratify(phantom, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["import-patches", phantom[1], "--out", tmp_path / "imp", "--stratify"], monkeypatch, capsys)
    assert code == 0, err
    assert "class mix per split" in out
    meta = json.loads((tmp_path / "imp" / "dataset.json").read_text())
    assert meta["parameters"]["stratify"] is True
    rows = read_manifest(tmp_path / "imp")
    comp = group_composition(rows, ("background", "benign", "malignant"))
    split = {r["group"]: r["split"] for r in rows}
    plain = assign_splits(list(comp), 0.2, 0.2, 0)
    assert split_imbalance(split, comp, {"val": 0.2, "test": 0.2}) <= split_imbalance(
        plain, comp, {"val": 0.2, "test": 0.2})


def test_prepare_stratify_is_another_dataset(phantom):
    """`--stratify` changes the split, so an existing unstratified dataset is not taken as done."""
    slides, dataset = phantom
    with pytest.raises(UserInputError, match="different dataset"):
        prepare_dataset(slides, dataset, tiny_cfg(stratify=True), groups_csv=slides / "groups.csv", log=lambda m: None)
    with pytest.raises(UserInputError, match="--stratify"):
        tiny_cfg(stratify="yes")
