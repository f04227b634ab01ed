"""``diffusiondci train-seg``: the segmentation stage (paper §IV-C2, §V-A3, Tables 5-6, Fig. 6).

This module is the trainer: it builds the model, runs the optimizer steps, validates and scores.
Its parts live beside it: the settings and variants in :mod:`~diffusiondci.train.seg_config`, the
training data (label budget, synthetic pairs) in :mod:`~diffusiondci.train.seg_data`, and one
step's augmentation and loss in :mod:`~diffusiondci.train.seg_augment`. The optimizer is Adam with
``lr_warmup`` linear warm-up steps, then ``lr_schedule`` (``poly`` / ``cosine`` / ``constant``) to
``lr_min_ratio`` of the peak at the last planned step.

Validation on the real ``val`` split (mean Dice, mIoU; features of the un-moved images, cached
too) every ``val_every`` steps keeps ``checkpoints/best``; without a ``val`` split (``prepare
--val-fraction 0``: every annotated slide trains) the last checkpoint is the model
(``segmenter.json`` ``training.checkpoint_policy``). At the end that checkpoint is scored on the
``test`` split (``test_metrics.json``) under the run's test-time augmentation (``tta``, kept in
``segmenter.json`` for ``segment``). ``autocast: auto`` trains and validates in bf16 autocast where
the hardware computes bf16 natively (the frozen DSDM's features stay fp32).

Resumable exactly (:class:`~diffusiondci.train.loop.Trainer`), DDP-ready through ``torchrun``.
The run folder records the training data's colour-normalisation target and ROI geometry
(``segmenter.json``), so ``segment`` normalises a new slide exactly as the training data was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from .. import __version__
from ..data.imageio import read_mask, write_json_atomic
from ..data.patch_dataset import PatchDataset
from ..device import resolve_autocast
from ..errors import UserInputError
from ..evaluation.metrics import MetricAccumulator
from ..models.segmenter import Segmenter, init_from_dsdm, segmenter_unet_config
from ..models.unet import NUM_MASK_CLASSES
from ..runs.seeds import derive_seed
from ..segmentation.feature_cache import FeatureCache
from ..segmentation.features import DiffusionFeatureExtractor
from ..segmentation.model import SEG_FORMAT, SEG_META, SegmentationModel
from ..segmentation.run import load_segmenter
from ..segmentation.tta import predict_with_tta
from . import distributed as dist_utils
from .data_order import steps_per_epoch
from .dsdm import UNET_PRESETS
from .loop import Trainer
from .lr_schedule import make_lr_scheduler
from .run_config import preflight_run_folder

# the settings, data and augmentation of the stage live in their own modules; their names stay
# importable from here (``train_seg`` looks ``make_loss`` and ``augment_views`` up in this module)
from .seg_augment import (
    ViewFeatures,
    apply_dihedral,
    augment_batch,
    augment_views,
    class_weights,
    colour_jitter,
    draw_dihedral,
    make_loss,
    random_zoom,
)
from .seg_config import INITS, LABEL_UNITS, LOSSES, VAL_METRICS, SegConfig
from .seg_data import Pairs, choose_labelled, data_record, filter_synthetic, labelled_groups, synthetic_subset

__all__ = [
    "SegConfig",
    "augment_batch",
    "augment_views",
    "make_loss",
    "choose_labelled",
    "labelled_groups",
    "predict_dataset",
    "synthetic_subset",
    "train_seg",
]

# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _dsdm_section(dsdm_run: Path, dsdm_model, schedule, info) -> dict[str, Any]:
    enc = info.encoder
    return {
        "source_run": str(dsdm_run.resolve()),
        "checkpoint": str(info.checkpoint),
        "step": info.step,
        "unet": dsdm_model.config.to_dict(),
        "num_timesteps": schedule.num_timesteps,
        "noise_schedule": schedule.schedule_name,
        "encoder": {"embed_dim": enc.embed_dim, "width": enc.width} if enc is not None else None,
    }


def check_blocks(blocks: list[int], num_blocks: int, dsdm_run: Path) -> None:
    """The injected decoder blocks must exist in the DSDM: a preset's default blocks belong to the
    U-Net depth of that preset, so a DSDM of another depth needs other ones (a clear error, not an
    index error deep inside the network)."""
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise UserInputError(
            f"blocks {blocks} (--blocks, or seg.blocks of the preset) include {bad}, which this DSDM lacks: its "
            f"U-Net depth gives decoder blocks 0..{num_blocks - 1}; pass --blocks with blocks in that range "
            "(`diffusiondci probe` ranks them)", dsdm_run)


def build_model(
    cfg: SegConfig, image_size: int, dsdm_run: Path | None
) -> tuple[SegmentationModel, dict[str, Any], dict[str, Any] | None]:
    """The segmentation model, its architecture record and the DSDM initialisation report."""
    from ..diffusion.dsdm_run import load_dsdm

    if dsdm_run is None:
        if cfg.injection != "none" or cfg.init == "dsdm":
            raise UserInputError(
                f"--injection {cfg.injection} --init {cfg.init} needs --dsdm RUN; without a DSDM use "
                "--injection none --init scratch (the plain U-Net baseline)"
            )
        unet_cfg = segmenter_unet_config(UNET_PRESETS[cfg.unet](image_size=image_size), NUM_MASK_CLASSES)
        torch.manual_seed(cfg.seed)
        model = SegmentationModel(Segmenter(unet_cfg, "none"), None)
        record = {"unet": unet_cfg.to_dict(), "injection": "none", "blocks": [], "timesteps": [], "dsdm": None}
        return model, record, None

    dsdm, schedule, info = load_dsdm(dsdm_run, checkpoint="latest", ema=True, device="cpu")
    if dsdm.config.image_size != image_size:
        raise UserInputError(
            f"the DSDM was trained on {dsdm.config.image_size} px patches, the dataset has {image_size} px", dsdm_run
        )
    unet_cfg = segmenter_unet_config(dsdm.config, NUM_MASK_CLASSES)
    features = None
    channels: dict[int, int] = {}
    if cfg.injection != "none":
        check_blocks(cfg.blocks, dsdm.num_decoder_blocks, dsdm_run)
        features = DiffusionFeatureExtractor(dsdm, schedule, info.encoder, cfg.blocks, cfg.timesteps, cfg.feature_seed,
                                             noise="shared", feature_dtype=cfg.feature_dtype)
        channels = features.feature_channels()
    torch.manual_seed(cfg.seed)
    segmenter = Segmenter(unet_cfg, cfg.injection, channels, cfg.kv_size, caa_window=cfg.caa_window,
                          pos_encoding="nyquist")
    report = init_from_dsdm(segmenter, dsdm.state_dict()) if cfg.init == "dsdm" else None
    record = {
        "unet": unet_cfg.to_dict(),
        "injection": cfg.injection,
        "blocks": features.blocks if features is not None else [],
        "timesteps": features.timesteps if features is not None else [],
        "kv_size": cfg.kv_size,
        "caa_window": cfg.caa_window,
        "caa_pos": "nyquist",
        "feature_seed": cfg.feature_seed,
        "feature_noise": "shared",
        "feature_dtype": cfg.feature_dtype,
        "dsdm": _dsdm_section(dsdm_run, dsdm, schedule, info) if features is not None else None,
        "init_from": str(dsdm_run.resolve()) if cfg.init == "dsdm" else None,
    }
    return SegmentationModel(segmenter, features), record, report


# --------------------------------------------------------------------------------------------
# prediction / validation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 16,
    features: Callable[[torch.Tensor], Mapping[int, torch.Tensor]] | None = None, autocast: str | None = None,
    tta: str = "none",
) -> MetricAccumulator:
    """Scores of ``model`` on every item of ``dataset`` (``image``, ``mask``); ``features(images)``,
    if given, supplies the DSDM features (``model(images, features)``, e.g. from the cache);
    ``autocast="bf16"`` runs the network in bf16 autocast (as it trained); ``tta`` averages the
    predictions of flipped / turned views (:mod:`diffusiondci.segmentation.tta`)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    acc = MetricAccumulator(NUM_MASK_CLASSES)
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            logits = predict_with_tta(
                (lambda v: model(v, features(v))) if features is not None else model, x, tta)
        acc.update(logits.argmax(1).cpu().numpy(), torch.stack([it["mask"] for it in items]).numpy())
    model.train(was)
    return acc


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def feature_cache(cfg: SegConfig, model: SegmentationModel, dsdm_run: Path | None) -> FeatureCache | None:
    """The frozen DSDM's feature cache of this run (None without injection); ``feature_cache``:
    ``dsdm`` = ``<dsdm run>/feature_cache``, ``off`` = computed at every use, else a folder."""
    if model.features is None:
        return None
    where = str(cfg.feature_cache)
    if where == "off":
        root = None
    elif where == "dsdm":
        assert dsdm_run is not None
        root = dsdm_run / "feature_cache"
    else:
        root = Path(where).expanduser()
    return FeatureCache(model.features, root, int(cfg.feature_cache_gb * 1e9), cfg.feature_batch)

def train_seg(
    data: str | Path,
    run_dir: str | Path,
    cfg: SegConfig,
    dsdm_run: str | Path | None = None,
    synthetic: str | Path | None = None,
    filter_model: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    evaluate_test: bool = True,
) -> Path:
    """Train a segmenter on dataset ``data`` into ``run_dir`` (see the module docstring)."""
    data, run_dir = Path(data), Path(run_dir)
    preflight_run_folder(run_dir, "seg", resume)  # a wrong --out / --resume fails before any work
    dsdm_path = Path(dsdm_run) if dsdm_run is not None else None
    real = PatchDataset(data, splits=("train",), with_masks=True, labelled_only=True)
    if len(real) == 0:
        raise UserInputError("the dataset has no labelled training patches", data)
    val = PatchDataset(data, splits=("val",), with_masks=True, labelled_only=True)
    image = real[0]["image"]
    image_size = int(image.shape[-1])
    if image.shape[-1] != image.shape[-2]:
        raise UserInputError("patches must be square", real.image_path(0))

    chosen = choose_labelled(real.ids, cfg.labelled, cfg.label_seed, labelled_groups(real, cfg.label_unit))
    real_train: Dataset = Subset(real, chosen) if cfg.labelled is not None else real
    n_real = len(chosen)

    info = dist_utils.init_distributed(device)
    synth_record: dict[str, Any] | None = None
    parts: list[Dataset] = [Pairs(real_train, synthetic=False)]
    if cfg.synthetic_ratio > 0:
        if synthetic is None:
            raise UserInputError("--synthetic-ratio > 0 needs --synthetic DIR (the output of `diffusiondci sample`)")
        synth = PatchDataset(synthetic, splits=None, with_masks=True, labelled_only=True)
        if len(synth) and int(synth[0]["image"].shape[-1]) != image_size:
            raise UserInputError(f"synthetic patches are not {image_size} px like the real ones", synth.image_path(0))
        keep, filter_rows = None, None
        if filter_model is not None and cfg.filter_threshold is None:
            raise UserInputError("--filter-model needs --filter-threshold (the mean Dice a pair must reach)")
        if cfg.filter_threshold is not None:
            if filter_model is None:
                raise UserInputError("--filter-threshold needs --filter-model RUN (a segmenter trained on real data)")
            keep, filter_rows = filter_synthetic(synth, Path(filter_model), cfg.filter_threshold, info.device)
        picked = synthetic_subset(synth, n_real, cfg.synthetic_ratio, cfg.seed, keep)
        parts.append(Pairs(Subset(synth, picked), synthetic=True))
        synth_record = {
            "folder": str(Path(synthetic).resolve()),
            "available": len(synth),
            "filter_threshold": cfg.filter_threshold,
            "filter_model": str(Path(filter_model).resolve()) if filter_model and keep is not None else None,
            "kept": len(keep) if keep is not None else len(synth),
            "dropped": len(synth) - len(keep) if keep is not None else 0,
            "used": len(picked),
            "ratio": cfg.synthetic_ratio,
            "real": n_real,
            "used_ids": [synth.ids[i] for i in picked],
            "filter": filter_rows,
        }
    train_set: Dataset = ConcatDataset(parts) if len(parts) > 1 else parts[0]

    model, record, init_report = build_model(cfg, image_size, dsdm_path)
    batch_size = min(cfg.batch_size, len(train_set))  # type: ignore[arg-type]
    per_epoch = steps_per_epoch(len(train_set), batch_size, info.world_size)  # type: ignore[arg-type]
    total_steps = cfg.steps if cfg.steps is not None else int(cfg.epochs or 0) * max(per_epoch, 1)
    val_every = cfg.val_every or max(per_epoch, 1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_lr_scheduler(optimizer, cfg.lr_schedule, total_steps, cfg.lr_warmup, cfg.lr_min_ratio)
    aug_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, info.rank, 17))
    # the mask files alone (not the images): read only when class_weights asks for them
    weights = class_weights(cfg.class_weights, (torch.from_numpy(read_mask(real.mask_path(i))) for i in chosen),
                            NUM_MASK_CLASSES)
    loss_fn = make_loss(cfg.loss, weights)
    cache = feature_cache(cfg, model, dsdm_path)
    precision = resolve_autocast(cfg.autocast, info.device)

    def view_features(views: torch.Tensor, states: list[int]) -> Mapping[int, torch.Tensor]:
        assert cache is not None
        return cache.features(views)  # keyed by the view itself: dihedral(image, k), un-jittered

    def step_fn(m: nn.Module, batch: dict, step: int) -> dict:
        before = dict(cache.stats) if cache is not None else None
        x, y, feats = augment_views(batch["image"], batch["mask"], cfg, aug_gen,
                                    view_features if cache is not None else None)
        loss = loss_fn(m(x, feats) if feats is not None else m(x), y)
        out = {"loss": loss, "synthetic_fraction": batch["synthetic"].float().mean()}
        if cache is not None and before is not None:
            out["feature_hits"] = (cache.stats["hits"] - before["hits"]) / max(len(batch["image"]), 1)
        return out

    def val_fn(m: nn.Module, step: int) -> dict:
        if len(val) == 0:
            return {}
        fetch = cache.features if cache is not None else None
        scores = predict_dataset(m, val, features=fetch, autocast=precision).compute()
        pooled = scores["dataset"]
        return {"dice": scores["mean_dice"] or 0.0, "miou": scores["mean_iou"] or 0.0,
                "dice_dataset": pooled["mean_dice"] or 0.0, "miou_dataset": pooled["mean_iou"] or 0.0}

    config = {
        "stage": "seg",
        "data": str(data.resolve()),
        "dsdm": str(dsdm_path.resolve()) if dsdm_path is not None else None,
        "synthetic": str(Path(synthetic).resolve()) if synthetic is not None and cfg.synthetic_ratio > 0 else None,
        "filter_model": str(Path(filter_model).resolve()) if filter_model is not None else None,
        # where the feature cache lives and its bound change no result: a resumed run may move it
        **{k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("steps", "epochs", "num_workers", "feature_cache", "feature_cache_gb")},
    }
    trainer = Trainer(
        run_dir, model, optimizer, train_set, batch_size, step_fn, total_steps, seed=cfg.seed, config=config,
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, val_fn=val_fn if len(val) else None,
        val_every=val_every, best_key=VAL_METRICS[cfg.val_metric] if len(val) else None, best_mode="max",
        val_use_ema=False,
        resume=resume, device=device, num_workers=cfg.num_workers, progress=progress,
        generators={"seg_augment": aug_gen}, scheduler=scheduler, autocast=precision,
    )
    if trainer.is_main:
        seg_record = {
            "format": SEG_FORMAT,
            "diffusiondci_version": __version__,
            **record,
            "num_classes": NUM_MASK_CLASSES,
            "tta": cfg.tta,  # test-time augmentation of the test scoring and of `segment`
            "data": data_record(real, image_size),
            "training": {
                "steps": total_steps, "batch_size": batch_size, "labelled": cfg.labelled,
                "label_seed": cfg.label_seed, "label_unit": cfg.label_unit, "num_labelled": n_real,
                "labelled_ids": [real.ids[i] for i in chosen] if cfg.labelled is not None else None,
                "synthetic_used": synth_record["used"] if synth_record else 0,
                "loss": cfg.loss, "class_weights": weights.tolist() if weights is not None else None,
                "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "lr_warmup": cfg.lr_warmup,
                "augment": cfg.augment, "scale_range": cfg.scale_range, "precision": precision or "fp32",
                # best on the val split when there is one, else the last step (prepare --val-fraction 0)
                "checkpoint_policy": f"best_val_{VAL_METRICS[cfg.val_metric]}" if len(val) else "last",
            },
            "feature_cache": ({"folder": str(cache.folder), "settings": cache.settings}
                              if cache is not None and cache.folder is not None else None),
        }
        write_json_atomic(run_dir / SEG_META, seg_record, sort_keys=True)
        if init_report is not None:
            write_json_atomic(run_dir / "init_report.json", init_report)
        if synth_record is not None:
            write_json_atomic(run_dir / "synthetic.json", synth_record)
    dist_utils.barrier()
    trainer.fit()
    if evaluate_test and trainer.is_main:
        evaluate_run(run_dir, data, split="test", device=trainer.device)
    dist_utils.barrier()
    return run_dir


def evaluate_run(run_dir: str | Path, data: str | Path, split: str = "test", device=None,
                 tta: str | None = None) -> dict[str, Any] | None:
    """Score the run's best checkpoint (latest if none) on ``split`` of ``data`` with the run's
    test-time augmentation (or ``tta``); writes ``<split>_metrics.json``."""
    ds = PatchDataset(data, splits=(split,), with_masks=True, labelled_only=True)
    if len(ds) == 0:
        return None
    run = load_segmenter(run_dir, device=device, tta=tta)
    scores = predict_dataset(run.model, ds, tta=run.tta).compute()
    scores["split"] = split
    scores["checkpoint"] = str(run.checkpoint)
    scores["tta"] = run.tta
    write_json_atomic(Path(run_dir) / f"{split}_metrics.json", scores)
    return scores
