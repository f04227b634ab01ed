"""``diffusiondci evaluate-seg``: pairing, hand-computed scores, errors, outputs and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffusiondci.errors import UserInputError
from diffusiondci.evaluation.seg_eval import evaluate_folder, pair_files


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _masks(n: int, seed: int = 0, shape=(40, 50)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 3, shape).astype(np.uint8) for _ in range(n)]


def test_perfect_prediction_gives_dice_one(tmp_path):
    for i, m in enumerate(_masks(3)):
        _save(tmp_path / "pred" / f"s{i}_labels.png", m)
        _save(tmp_path / "truth" / f"s{i}_mask.png", m)
    _save(tmp_path / "pred" / "s0_overlay.png", np.zeros((4, 4, 3)))  # ignored: not *_labels
    (tmp_path / "pred" / "s0.geojson").write_text("{}")
    metrics = evaluate_folder(tmp_path / "pred", tmp_path / "truth", log=lambda _: None)
    assert metrics["num_images"] == 3
    assert metrics["mean_dice"] == 1.0 and metrics["mean_iou"] == 1.0 and metrics["accuracy"] == 1.0
    assert metrics["dice_per_class"] == [1.0, 1.0, 1.0]
    assert metrics["dataset"]["mean_dice"] == 1.0


def test_known_confusion_gives_hand_computed_scores(tmp_path):
    # truth: 6 background, 3 benign, 3 malignant; prediction errs on 1 benign -> malignant
    # and 2 background -> benign.
    truth = np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2]], np.uint8)
    pred = np.array([[0, 0, 0, 0, 1, 1], [1, 1, 2, 2, 2, 2]], np.uint8)
    _save(tmp_path / "pred" / "a.png", pred)
    _save(tmp_path / "truth" / "a.png", truth)
    lines: list[str] = []
    metrics = evaluate_folder(tmp_path / "pred", tmp_path / "truth", out_dir=tmp_path / "out",
                              log=lines.append)
    # background: TP 4, FP 0, FN 2; benign: TP 2, FP 2, FN 1; malignant: TP 3, FP 1, FN 0
    dice = [8 / 10, 4 / 7, 6 / 7]
    iou = [4 / 6, 2 / 5, 3 / 4]
    precision = [1.0, 2 / 4, 3 / 4]
    recall = [4 / 6, 2 / 3, 1.0]
    assert metrics["dice_per_class"] == pytest.approx(dice)
    assert metrics["iou_per_class"] == pytest.approx(iou)
    assert metrics["precision_per_class"] == pytest.approx(precision)
    assert metrics["recall_per_class"] == pytest.approx(recall)
    assert metrics["mean_dice"] == pytest.approx(np.mean(dice))
    assert metrics["mean_iou"] == pytest.approx(np.mean(iou))
    assert metrics["accuracy"] == pytest.approx(9 / 12)
    assert metrics["confusion_matrix"] == [[4, 2, 0], [0, 2, 1], [0, 0, 3]]
    assert any(line.startswith("benign") and f"{4 / 7:.3f}" in line for line in lines)

    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["mean_dice"] == pytest.approx(np.mean(dice))
    with (out / "per_image.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["stem"] == "a" and float(row["dice_benign"]) == pytest.approx(4 / 7)
    assert float(row["mean_iou"]) == pytest.approx(np.mean(iou))
    assert (out / "confusion.png").stat().st_size > 0 and (out / "cases.png").stat().st_size > 0


def test_per_image_averaging_and_cases_picture(tmp_path):
    truths = _masks(5, seed=1)
    rng = np.random.default_rng(2)
    for i, t in enumerate(truths):
        noisy = t.copy()
        flip = rng.random(t.shape) < 0.1 * i  # image i has ~10*i % of its pixels changed
        noisy[flip] = (noisy[flip] + 1) % 3
        _save(tmp_path / "pred" / f"s{i}_labels.png", noisy)
        _save(tmp_path / "truth" / f"s{i}_mask.png", t)
        _save(tmp_path / "images" / f"s{i}.png", np.full((*t.shape, 3), 40 * i))
    metrics = evaluate_folder(tmp_path / "pred", tmp_path / "truth", out_dir=tmp_path / "out",
                              images_dir=tmp_path / "images", n_cases=2, log=lambda _: None)
    per_image = [r["mean_dice"] for r in metrics["per_image"]]
    assert per_image[0] == 1.0 and per_image == sorted(per_image, reverse=True)
    assert metrics["mean_dice"] == pytest.approx(np.mean(per_image))
    assert metrics["mean_dice_std"] == pytest.approx(np.std(per_image))
    picture = np.asarray(Image.open(tmp_path / "out" / "cases.png"))
    assert picture.shape[0] > picture.shape[1]  # 4 rows (2 worst, 2 best) of 3 panels


def test_unmatched_files_warn_or_fail(tmp_path):
    m = _masks(1)[0]
    _save(tmp_path / "pred" / "a_labels.png", m)
    _save(tmp_path / "pred" / "extra_labels.png", m)
    _save(tmp_path / "truth" / "a_mask.png", m)
    _save(tmp_path / "truth" / "b_mask.png", m)
    lines: list[str] = []
    metrics = evaluate_folder(tmp_path / "pred", tmp_path / "truth", log=lines.append)
    assert metrics["num_images"] == 1
    assert metrics["unmatched"] == {"predictions": ["extra_labels.png"], "truths": ["b_mask.png"]}
    assert any("b_mask.png" in line and line.startswith("warning") for line in lines)
    with pytest.raises(UserInputError, match="b_mask.png") as err:
        pair_files(tmp_path / "pred", tmp_path / "truth", strict=True)
    assert "extra_labels.png" in str(err.value)

    _save(tmp_path / "other" / "zzz_mask.png", m)
    with pytest.raises(UserInputError, match="no prediction matches"):
        evaluate_folder(tmp_path / "pred", tmp_path / "other", log=lambda _: None)
    with pytest.raises(UserInputError, match="not found"):
        evaluate_folder(tmp_path / "nowhere", tmp_path / "truth", log=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no ground-truth label images"):
        evaluate_folder(tmp_path / "pred", tmp_path / "empty", log=lambda _: None)


def test_mismatched_or_invalid_files_name_the_file(tmp_path):
    _save(tmp_path / "pred" / "a_labels.png", np.zeros((10, 12)))
    _save(tmp_path / "truth" / "a_mask.png", np.zeros((10, 11)))
    with pytest.raises(UserInputError, match=r"a_labels.png.*10x12.*a_mask.png is 10x11"):
        evaluate_folder(tmp_path / "pred", tmp_path / "truth", log=lambda _: None)
    _save(tmp_path / "truth" / "a_mask.png", np.full((10, 12), 7))
    with pytest.raises(UserInputError, match="a_mask.png"):
        evaluate_folder(tmp_path / "pred", tmp_path / "truth", log=lambda _: None)
    _save(tmp_path / "truth" / "a_mask.png", np.zeros((10, 12)))
    _save(tmp_path / "pred" / "a_labels.tif", np.zeros((10, 12)))
    with pytest.raises(UserInputError, match="two prediction files for 'a'"):
        evaluate_folder(tmp_path / "pred", tmp_path / "truth", log=lambda _: None)


def test_cli_evaluate_seg(tmp_path):
    from diffusiondci.cli import app

    for i, m in enumerate(_masks(2, seed=3)):
        _save(tmp_path / "pred" / f"s{i}_labels.png", m)
        _save(tmp_path / "truth" / f"s{i}.png", m)
    result = CliRunner().invoke(app, ["evaluate-seg", "--pred", str(tmp_path / "pred"), "--truth",
                                      str(tmp_path / "truth"), "--out", str(tmp_path / "out"), "--cases", "1"])
    assert result.exit_code == 0, result.output
    assert "malignant" in result.output and "1.000" in result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_images"] == 2
    bad = CliRunner().invoke(app, ["evaluate-seg", "--pred", str(tmp_path / "pred"), "--truth",
                                   str(tmp_path / "missing")])
    assert isinstance(bad.exception, UserInputError)
