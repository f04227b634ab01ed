"""Segmentation metrics: hand-computed values and cross-checks against MONAI and torchmetrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou
from torchmetrics.functional.classification import (
    multiclass_f1_score,
    multiclass_jaccard_index,
    multiclass_precision,
    multiclass_recall,
)

from diffusiondci.evaluation.metrics import (
    MetricAccumulator,
    SegmentationScores,
    confusion_matrix,
    plot_confusion_matrix,
    scores_from_confusion,
)

# truth/pred pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
TRUTH = np.array([[0, 0, 1], [1, 2, 2]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 2, 0]], dtype=np.uint8)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TRUTH)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    # torch input, batch shape
    cm_t = confusion_matrix(torch.from_numpy(PRED).long()[None], torch.from_numpy(TRUTH).long()[None])
    np.testing.assert_array_equal(cm_t, cm)


def test_confusion_matrix_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"labels \[3\] outside \[0, 2\]"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 1]), np.array([-1, 1]))
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]))


def test_scores_by_hand():
    s = scores_from_confusion(confusion_matrix(PRED, TRUTH))
    # class 0: TP=1 FP=1 FN=1; class 1: TP=2 FP=1 FN=0; class 2: TP=1 FP=0 FN=1
    np.testing.assert_allclose(s["dice_per_class"], [2 / 4, 4 / 5, 2 / 3])
    np.testing.assert_allclose(s["iou_per_class"], [1 / 3, 2 / 3, 1 / 2])
    np.testing.assert_allclose(s["precision_per_class"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(s["recall_per_class"], [1 / 2, 1.0, 1 / 2])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["mean_dice"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert s["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    fg = scores_from_confusion(confusion_matrix(PRED, TRUTH), include_background=False)
    assert fg["mean_dice"] == pytest.approx((0.8 + 2 / 3) / 2)
    json.dumps(s)  # JSON-safe


def test_empty_class_conventions():
    truth = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 0], [0, 0]])
    s = scores_from_confusion(confusion_matrix(pred, truth))
    # class 2 absent from both -> None and excluded from the means
    assert s["dice_per_class"][2] is None and s["precision_per_class"][2] is None
    # class 1 in truth, never predicted -> 0 everywhere (precision too)
    assert s["dice_per_class"][1] == 0 and s["iou_per_class"][1] == 0
    assert s["precision_per_class"][1] == 0 and s["recall_per_class"][1] == 0
    # class 0: TP=2 FP=2 FN=0
    assert s["dice_per_class"][0] == pytest.approx(4 / 6)
    assert s["mean_dice"] == pytest.approx((4 / 6 + 0) / 2)
    assert s["mean_precision"] == pytest.approx((0.5 + 0) / 2)

    # class predicted but absent from truth -> 0 (all false positives)
    s2 = scores_from_confusion(confusion_matrix(np.array([0, 2]), np.array([0, 0])))
    assert s2["dice_per_class"][2] == 0 and s2["recall_per_class"][2] == 0 and s2["precision_per_class"][2] == 0
    assert s2["dice_per_class"][1] is None

    empty = SegmentationScores(np.zeros((3, 3), np.int64))
    assert math.isnan(empty.accuracy) and empty.to_dict()["mean_dice"] is None


def _one_hot(x: torch.Tensor, c: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.long(), c).permute(0, 3, 1, 2).float()


def test_per_image_matches_monai():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (4, 16, 16), generator=g)
    pred = torch.where(torch.rand(4, 16, 16, generator=g) < 0.6, truth, torch.randint(0, 3, (4, 16, 16), generator=g))
    ref_dice = compute_dice(_one_hot(pred), _one_hot(truth), include_background=True).numpy()
    ref_iou = compute_iou(_one_hot(pred), _one_hot(truth), include_background=True).numpy()
    for i in range(4):
        s = SegmentationScores(confusion_matrix(pred[i], truth[i]))
        np.testing.assert_allclose(s.dice, ref_dice[i], rtol=1e-6)
        np.testing.assert_allclose(s.iou, ref_iou[i], rtol=1e-6)

    # absent from both: NaN like MONAI's ignore_empty=True; predicted but not in truth: 0 like ignore_empty=False
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    p = t.clone()
    p[0, 0, 0] = 2
    s = SegmentationScores(confusion_matrix(p, t))
    m_ignore = compute_dice(_one_hot(p), _one_hot(t), ignore_empty=True)[0].numpy()
    m_keep = compute_dice(_one_hot(p), _one_hot(t), ignore_empty=False)[0].numpy()
    assert math.isnan(s.dice[1]) and math.isnan(m_ignore[1])
    assert s.dice[2] == 0 and m_keep[2] == 0
    assert s.dice[0] == pytest.approx(m_ignore[0])


def test_dataset_level_matches_torchmetrics():
    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 3, (3, 20, 20), generator=g)
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.5, truth, torch.randint(0, 3, (3, 20, 20), generator=g))
    acc = MetricAccumulator()
    acc.update(pred, truth)
    res = acc.compute()["dataset"]
    kw = dict(num_classes=3, average=None)
    np.testing.assert_allclose(res["dice_per_class"], multiclass_f1_score(pred, truth, **kw).numpy(), rtol=1e-5)
    np.testing.assert_allclose(res["iou_per_class"], multiclass_jaccard_index(pred, truth, **kw).numpy(), rtol=1e-5)
    np.testing.assert_allclose(res["precision_per_class"], multiclass_precision(pred, truth, **kw).numpy(), rtol=1e-5)
    np.testing.assert_allclose(res["recall_per_class"], multiclass_recall(pred, truth, **kw).numpy(), rtol=1e-5)
    assert res["accuracy"] == pytest.approx(float((pred == truth).float().mean()))


def test_accumulator_per_image_vs_dataset():
    acc = MetricAccumulator()
    acc.update(PRED, TRUTH)  # image 1: mean dice (0.5 + 0.8 + 2/3) / 3, accuracy 4/6
    acc.update(np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.uint8))  # image 2: only class 0, perfect
    out = acc.compute()
    assert out["num_images"] == 2 and out["aggregation"] == "per_image"
    m1 = (0.5 + 0.8 + 2 / 3) / 3
    assert out["mean_dice"] == pytest.approx((m1 + 1.0) / 2)
    assert out["mean_dice_std"] == pytest.approx(abs(1.0 - m1) / 2)
    assert out["accuracy"] == pytest.approx((4 / 6 + 1.0) / 2)
    # per-class per-image: class 1 only scored on image 1
    assert out["dice_per_class"] == pytest.approx([(0.5 + 1.0) / 2, 0.8, 2 / 3])
    # dataset level: summed cm [[7,1,0],[0,2,0],[1,0,1]]
    assert out["confusion_matrix"] == [[7, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["dataset"]["dice_per_class"][0] == pytest.approx(14 / 16)
    assert out["dataset"]["accuracy"] == pytest.approx(10 / 12)
    json.dumps(out)
    acc.reset()
    with pytest.raises(ValueError, match="no images"):
        acc.compute()


def test_plot_confusion_matrix(tmp_path):
    cm = confusion_matrix(PRED, TRUTH)
    p = plot_confusion_matrix(cm, tmp_path / "sub" / "cm.png")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p2 = plot_confusion_matrix(np.zeros((3, 3)), tmp_path / "raw.png", normalize=False)
    assert p2.stat().st_size > 0
