"""Test-time augmentation (issue 17): views moved back exactly, the averaged decision, and the run's
own mode used by the test scoring and ``segment`` unless replaced."""

from __future__ import annotations

import json

import pytest
import torch

from diffusiondci.data.augment import dihedral, inverse_dihedral
from diffusiondci.errors import UserInputError
from diffusiondci.segmentation.run import load_segmenter
from diffusiondci.segmentation.tta import predict_with_tta, tta_views
from diffusiondci.train.segmentation import train_seg
from tests.test_dsdm import build_inputs
from tests.test_segmentation import seg_cfg


def test_inverse_dihedral_undoes_every_move():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    for k in range(8):
        assert torch.equal(inverse_dihedral(dihedral(x, k), k), x), k
    assert len({tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}) == 8
    with pytest.raises(ValueError):
        inverse_dihedral(x, 8)


def test_tta_averages_view_probabilities_mapped_back():
    """A pixel-wise (hence dihedral-equivariant) model: every view agrees, so TTA gives its own
    probabilities. A model that only looks at the column index: under ``flip`` the averaged
    probabilities are mirror-symmetric, and equal the closed-form mean of the two views."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6, 6)
    weight = torch.randn(3, 3)

    def pixelwise(v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,nchw->nkhw", weight, v)

    for mode in ("flip", "dihedral"):
        out = predict_with_tta(pixelwise, x, mode)
        assert torch.allclose(out.exp(), pixelwise(x).softmax(1), atol=1e-6)
    assert torch.equal(predict_with_tta(pixelwise, x, "none"), pixelwise(x))

    def by_column(v: torch.Tensor) -> torch.Tensor:
        col = torch.arange(v.shape[-1], dtype=torch.float32).expand(v.shape[0], v.shape[-2], -1)
        return torch.stack([col, torch.zeros_like(col), -col], dim=1)

    probs = predict_with_tta(by_column, x, "flip").exp()
    expected = (by_column(x).softmax(1) + by_column(x).softmax(1).flip(-1)) / 2
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(probs, probs.flip(-1), atol=1e-6)
    assert probs.sum(1).allclose(torch.ones(3, 6, 6))
    assert tta_views("dihedral") == tuple(range(8)) and tta_views("flip") == (0, 4)
    with pytest.raises(UserInputError, match="tta"):
        predict_with_tta(by_column, x, "mirror")


def test_run_records_its_tta_and_scoring_and_segment_use_it(tmp_path):
    inputs = build_inputs(tmp_path / "inputs")
    cfg = seg_cfg(injection="none", init="scratch", steps=2, tta="flip", autocast="fp32")
    run_dir = train_seg(inputs["data"], tmp_path / "run", cfg, progress=False)
    assert json.loads((run_dir / "segmenter.json").read_text())["tta"] == "flip"
    assert json.loads((run_dir / "test_metrics.json").read_text())["tta"] == "flip"
    run = load_segmenter(run_dir, device="cpu")
    assert run.tta == "flip"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = run.model(x)
        mean = (raw.softmax(1) + run.model(x.flip(-1)).softmax(1).flip(-1)) / 2
    assert torch.allclose(run.predict(x).exp(), mean, atol=1e-5)
    single = load_segmenter(run_dir, device="cpu", tta="none")
    assert single.tta == "none" and torch.allclose(single.predict(x), raw, atol=1e-6)
    with pytest.raises(UserInputError, match="tta"):
        load_segmenter(run_dir, device="cpu", tta="all")
