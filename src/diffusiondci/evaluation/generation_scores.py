"""Scores of one trained generator for the Table 1 / Table 2 experiments.

For the first ``n_eval`` test patches of a dataset the generator is conditioned on each patch's
mask (and, for reference-conditioned variants, on the patch itself as reference image) and
sampled once; then

* ``fd_encoder`` / ``kid_encoder``: Frechet distance and KID between the generated and the real
  test images in the reference encoder's feature space (no Inception weights needed);
* ``fd_pca`` / ``fd_pca_real``: the same two FDs after projecting onto the top principal axes of
  other real training patches, whitened (at most ``n_eval / 4`` axes, 16 at most): with fewer
  samples than feature dimensions the full FD is mostly small-sample bias, the projected one is
  well-posed (:class:`~.generation_metrics.PrincipalProjection`); None without enough patches;
* ``fid``: the same with Inception features when ``cfg.inception`` names a TorchScript file;
* ``diversity``: the paper's LPIPS diversity (mean pairwise LPIPS-style distance over the encoder's
  feature maps) among ``diversity_samples`` samples of each of ``diversity_masks`` masks;
* ``miou_generated``: a segmenter trained on real data segments the generated images; mean IoU
  against the masks they were conditioned on (how well the layout was followed);
* ``fd_encoder_real`` and ``miou_real``: the same two measures for ``n_eval`` *real* images (train
  patches against the test set; the real test patches under the same segmenter), the values a
  perfect generator would reach, so that the generated ones can be read.

The sample folders are kept (contact sheets and denoising strips go into the report); the scores
are cached in ``scores.json`` so that a rerun only computes what is missing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.imageio import read_mask, read_rgb, write_json_atomic
from ..data.patch_dataset import PatchDataset, to_tensor_image
from .experiment_runs import ensure_samples
from .generation_metrics import (
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    PrincipalProjection,
    diversity,
    frechet_distance,
    kernel_inception_distance,
)
from .metrics import MetricAccumulator

__all__ = ["SCORE_KEYS", "score_generator"]

#: What :func:`score_generator` returns (a cached ``scores.json`` missing any of them is recomputed).
SCORE_KEYS = ("fd_encoder", "fd_encoder_real", "fd_pca", "fd_pca_real", "kid_encoder", "fid", "diversity",
              "miou_generated", "miou_real", "n_eval")
#: Most principal axes of the projected FD (fewer when ``n_eval / 4`` is smaller).
PCA_DIMS = 16
#: Real training patches the principal axes are fitted on (after the yardstick's ``n_eval``).
BASIS_PATCHES = 256


def _subset_folder(data: Path, ids: list[str], out: Path) -> tuple[Path, Path]:
    masks, refs = out / "masks", out / "references"
    if not (out / "done").is_file():
        for folder in (masks, refs):
            folder.mkdir(parents=True, exist_ok=True)
        for pid in ids:
            shutil.copy(data / "masks" / f"{pid}.png", masks / f"{pid}.png")
            shutil.copy(data / "images" / f"{pid}.png", refs / f"{pid}.png")
        (out / "done").write_text("ok\n")
    return masks, refs


def score_generator(
    dsdm: Path, data: Path, out: Path, preset: str, cfg: Any, guidance: float | None, seed: int,
    real_seg: Path, encoder_run: Path, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from ..segmentation.run import load_segmenter
    from ..train.encoder import load_encoder_run

    marker = out / "scores.json"
    if marker.is_file():
        cached = json.loads(marker.read_text())
        if all(k in cached for k in SCORE_KEYS):
            return cached
    test = PatchDataset(data, splits=("test",), cache=False)
    ids = test.ids[: cfg.n_eval]
    eval_masks, eval_refs = _subset_folder(data, ids, out.parent / f"eval_{data.name}")
    samples = ensure_samples(dsdm, eval_masks, out / "samples", preset, cfg.sample_steps, split=None,
                             guidance=guidance, seed=seed, references=eval_refs, log=log, sampler=cfg.sample_sampler)
    div_ids = ids[: cfg.diversity_masks]
    div_masks, div_refs = _subset_folder(data, div_ids, out.parent / f"div_{data.name}")
    div_out = ensure_samples(dsdm, div_masks, out / "diversity", preset, cfg.sample_steps, split=None,
                             num_samples=cfg.diversity_samples, guidance=guidance, seed=seed, references=div_refs,
                             log=log, sampler=cfg.sample_sampler)

    encoder, _ = load_encoder_run(encoder_run)
    feats = ModuleFeatureExtractor(encoder)
    fake = np.stack([read_rgb(samples / "images" / f"{pid}.png") for pid in ids])
    real = np.stack([read_rgb(data / "images" / f"{pid}.png") for pid in test.ids[:512]])
    f_fake, f_real = feats(fake), feats(real)
    train = PatchDataset(data, splits=("train",), cache=False)
    real_train = np.stack([read_rgb(data / "images" / f"{pid}.png") for pid in train.ids[: len(ids)]])
    f_train = feats(real_train)
    basis_ids = train.ids[len(ids) : len(ids) + BASIS_PATCHES]
    dims = min(PCA_DIMS, len(ids) // 4, len(basis_ids) - 1)
    fd_pca = fd_pca_real = proj = None
    if dims >= 1:
        basis = feats(np.stack([read_rgb(data / "images" / f"{pid}.png") for pid in basis_ids]))
        try:
            proj = PrincipalProjection(basis, dims)
        except ValueError as err:  # e.g. training patches too alike to span `dims` axes
            log(f"projected FD skipped: {err}")
    if proj is not None:
        fd_pca = round(frechet_distance(proj(f_fake), proj(f_real)), 4)
        fd_pca_real = round(frechet_distance(proj(f_train), proj(f_real)), 4)
    scores: dict[str, Any] = {
        "fd_encoder": round(frechet_distance(f_fake, f_real), 4),
        "fd_encoder_real": round(frechet_distance(f_train, f_real), 4),
        "fd_pca": fd_pca,
        "fd_pca_real": fd_pca_real,
        "kid_encoder": round(kernel_inception_distance(f_fake, f_real, subsets=50, subset_size=None)[0], 6),
        "fid": None,
    }
    if cfg.inception:
        inc = InceptionFeatureExtractor.from_file(cfg.inception)
        scores["fid"] = round(frechet_distance(inc(fake), inc(real)), 4)
    groups = [
        torch.stack([to_tensor_image(read_rgb(div_out / "images" / f"{pid}_s{j}.png"))
                     for j in range(cfg.diversity_samples)]) if cfg.diversity_samples > 1
        else torch.stack([to_tensor_image(read_rgb(div_out / "images" / f"{pid}.png"))])
        for pid in div_ids
    ]
    scores["diversity"] = round(diversity(groups, encoder.feature_maps), 5) if cfg.diversity_samples > 1 else None
    seg = load_segmenter(real_seg, device="cpu")
    for key, images in (("miou_generated", fake), ("miou_real", real[: len(ids)])):
        acc = MetricAccumulator()
        with torch.no_grad():
            for start in range(0, len(ids), 16):
                chunk = ids[start : start + 16]
                x = torch.stack([to_tensor_image(img) for img in images[start : start + 16]])
                pred = seg.predict(x).argmax(1).numpy()
                acc.update(pred, np.stack([read_mask(eval_masks / f"{pid}.png") for pid in chunk]))
        scores[key] = round(acc.compute()["mean_iou"], 4)
    scores["n_eval"] = len(ids)
    write_json_atomic(marker, scores)
    return scores
