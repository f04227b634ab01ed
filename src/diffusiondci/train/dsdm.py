"""``diffusiondci train-dsdm``: train the DSDM generator (paper §IV-B2, §V-A2) in a run folder.

Each optimizer step (paper eqs. 8, 14-17):

1. t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x_0, t, eps) (eq. 4);
2. conditions y = (one-hot semantic mask, reference embedding F_r); per sample, the mask, the
   reference or both are replaced by their NULL versions with probabilities ``p_drop_mask``,
   ``p_drop_ref``, ``p_drop_both`` (classifier-free guidance training, §IV-B2c);
3. loss = L_hybrid = L_simple + lambda * L_vlb (eq. 14, :func:`diffusiondci.diffusion.losses.hybrid_loss`).

The recipe around it (each a config field): the image and its mask get the same random dihedral
transform (``augment``; flips and quarter turns keep tissue labels valid); L_simple may carry
min-SNR-gamma weights (``loss_weighting``, Hang et al. 2023); the learning rate warms up over
``lr_warmup`` steps and then follows ``lr_schedule`` down to ``lr_min_ratio`` of the peak by the last
planned step; ``autocast`` runs the network in bf16 where the hardware has it natively.

Label-efficient mode (``use_unlabelled``, on by default): classifier-free guidance already trains
the network on (image, NULL mask, reference) pairs, so a patch without a mask is a valid training
sample with the NULL mask condition and its own reference embedding. Unlabelled training patches
join the training set; in the loss they always get the NULL mask (after the usual random draws,
which are made for every sample so the random stream does not depend on labels; their reference
is still dropped at random). Without unlabelled patches training is exactly what it was.

t, eps and the drop draws come from a dedicated ``torch.Generator`` registered with the
:class:`~diffusiondci.train.loop.Trainer`, so a resumed run is bit-identical to an uninterrupted one;
the Trainer does EMA, checkpoints, DDP (``torchrun``) and the NaN guard.

Reference image of a training patch: the patch itself (the paper's encoder "extracts coarse
features F_1 from a noise-free reference DCI image I"); its embedding comes from the encoder run's
cache (``embeddings.safetensors``) when that cache was built from this very dataset folder, and is
computed with the encoder otherwise. Embeddings are fixed during training (the encoder is frozen).

The run folder is self-contained for sampling (:mod:`diffusiondci.diffusion.dsdm_run` loads it):
``dsdm.json`` (U-Net config, schedule, guidance-dropout settings, the training data's patch size,
classes and colour-normalisation record from its ``dataset.json``), ``encoder/`` (a copy of the
reference encoder) and the Trainer's ``checkpoints/`` (weights + EMA weights), ``log.csv``, ``tb/``.

Ablations (paper Table 1): ``decoder_norm="group"`` (no semantic mask: GroupNorm decoder),
``use_reference=False`` (no reference image: no MCAA, no encoder needed); both = the unconditional
baseline U-Net.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.augment import AUGMENTATIONS, random_dihedral
from ..data.patch_dataset import PatchDataset, to_uint8_image
from ..diffusion.guidance import drop_conditions
from ..device import AUTOCAST_CHOICES, resolve_autocast
from ..diffusion.losses import LOSS_WEIGHTINGS, hybrid_loss, min_snr_weights, timestep_sampler
from ..diffusion.schedule import DiffusionSchedule, ScheduleName
from ..errors import UserInputError
from ..models.conditions import mask_one_hot
from ..models.embedding import embed_dataset
from ..models.reference_encoder import ReferenceEncoder
from ..models.unet import DECODER_NORMS, UNET_PRESETS, DSDMUNet, UNetConfig
from ..runs.formats import DSDM_FORMAT, DSDM_META, DSDM_VERSION
from ..runs.record import write_run_record
from ..runs.seeds import derive_seed
from ..runs.weights import unwrap_model
from . import distributed as dist_utils
from .encoder import ENCODER_DIR, load_embeddings, load_encoder_run
from .loop import Trainer
from .lr_schedule import LR_SCHEDULES, make_lr_scheduler
from .run_config import preflight_run_folder

__all__ = [
    "DSDMConfig",
    "ReferencedPatches",
    "build_unet_config",
    "dsdm_loss",
    "null_training_conditions",
    "train_dsdm",
    "training_conditions",
    "training_embeddings",
]


@dataclass
class DSDMConfig:
    """Training settings of the DSDM generator (paper §V-A2: Adam, lr 1e-4, batch 10, 50 000 steps).

    ``unet`` names the network preset (:func:`~diffusiondci.models.unet.tiny_config` /
    :func:`~diffusiondci.models.unet.paper_config`), ``unet_overrides`` changes any
    :class:`~diffusiondci.models.unet.UNetConfig` field; ``decoder_norm`` / ``use_reference`` are the
    ablation switches. ``image_size`` and ``ref_dim`` are always taken from the data and the encoder.
    """

    unet: str = "tiny"
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    decoder_norm: str = "spade"  # "spade" (semantic mask via SPADE) | "group" (no-mask ablation)
    use_reference: bool = True  # False: no-reference ablation (no MCAA, no encoder)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 10
    steps: int = 50000
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    lambda_vlb: float = 0.001  # lambda of eq. 14
    num_timesteps: int = 1000  # T
    noise_schedule: str = "cosine"  # paper §V-A2
    p_drop_mask: float = 0.1  # classifier-free guidance dropouts (exclusive cases, see drop_conditions)
    p_drop_ref: float = 0.1
    p_drop_both: float = 0.1
    grad_clip: float | None = None  # not used by the paper / guided-diffusion
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 0
    sample_every: int = 0  # 0: no periodic samples
    sample_steps: int = 25  # DDIM steps of the periodic samples
    sample_count: int = 4
    num_workers: int = 0
    autocast: str | None = None  # auto | bf16 | fp32 (None = fp32); see diffusiondci.device.resolve_autocast
    lr_schedule: str = "constant"  # constant | cosine | poly (after the warm-up)
    lr_warmup: int = 0  # linear warm-up steps
    lr_min_ratio: float = 0.0  # the decayed LR at the last planned step, as a fraction of ``lr``
    augment: str = "none"  # none | hflip | dihedral (image and mask jointly)
    loss_weighting: str = "none"  # none | min_snr (weights of L_simple)
    min_snr_gamma: float = 5.0
    sample_guidance: list[float] = field(default_factory=lambda: [3.0])  # scales of the periodic previews
    seed: int = 0
    use_unlabelled: bool = True  # unlabelled training patches join with the NULL mask (label-efficient mode)

    def __post_init__(self) -> None:
        if self.unet not in UNET_PRESETS:
            raise UserInputError(f"dsdm.unet must be one of {sorted(UNET_PRESETS)}, got {self.unet!r}")
        if self.decoder_norm not in DECODER_NORMS:
            raise UserInputError(f"dsdm.decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        if not isinstance(self.unet_overrides, dict):
            raise UserInputError("dsdm.unet_overrides must be a mapping of UNetConfig fields")
        choices = {
            "autocast": (self.autocast, (None, *AUTOCAST_CHOICES)),
            "lr_schedule": (self.lr_schedule, LR_SCHEDULES),
            "augment": (self.augment, AUGMENTATIONS),
            "loss_weighting": (self.loss_weighting, LOSS_WEIGHTINGS),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserInputError(f"dsdm.{name} must be one of {[a for a in allowed if a]}, got {value!r}")
        if self.lr_warmup < 0 or not 0.0 <= self.lr_min_ratio <= 1.0 or self.min_snr_gamma <= 0:
            raise UserInputError("dsdm.lr_warmup must be >= 0, dsdm.lr_min_ratio in [0, 1], dsdm.min_snr_gamma > 0")
        self.sample_guidance = [float(g) for g in self.sample_guidance]
        probs = (self.p_drop_mask, self.p_drop_ref, self.p_drop_both)
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-9:
            raise UserInputError(
                f"guidance dropouts p_drop_mask/p_drop_ref/p_drop_both = {probs} must each lie in [0, 1] "
                "and sum to at most 1"
            )
        for name in ("batch_size", "num_timesteps", "log_every", "ckpt_every", "sample_steps", "sample_count"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"dsdm.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 1:
            raise UserInputError(f"dsdm.steps must be >= 1, got {self.steps}")
        if self.sample_every < 0 or self.lr <= 0:
            raise UserInputError("dsdm.sample_every must be >= 0 and dsdm.lr > 0")
        try:
            ScheduleName(self.noise_schedule)
        except ValueError:
            raise UserInputError(
                f"dsdm.noise_schedule must be one of {[s.value for s in ScheduleName]}, got {self.noise_schedule!r}"
            ) from None


def build_unet_config(cfg: DSDMConfig, image_size: int | None = None, ref_dim: int | None = None) -> UNetConfig:
    """The network configuration of a run: preset, then ``unet_overrides``, then the ablation switches,
    the data's patch size and the encoder's embedding size."""
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(cfg.unet_overrides) - known)
    if unknown:
        raise UserInputError(f"dsdm.unet_overrides: unknown UNetConfig keys {unknown}; valid keys: {sorted(known)}")
    kw: dict[str, Any] = dict(cfg.unet_overrides)
    kw.update(decoder_norm=cfg.decoder_norm, use_reference=cfg.use_reference)
    if image_size is not None:
        kw["image_size"] = int(image_size)
    if ref_dim is not None:
        kw["ref_dim"] = int(ref_dim)
    try:
        return UNET_PRESETS[cfg.unet](**kw)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"dsdm network config: {exc}") from None


# --------------------------------------------------------------------------------------------
# data: patches + reference embeddings
# --------------------------------------------------------------------------------------------


class ReferencedPatches(Dataset):
    """Training patches with their reference embedding: items ``image``, ``mask``, ``ref``, ``labelled``
    (False: ``mask`` is a placeholder, the loss uses the NULL mask), ``index``."""

    def __init__(self, base: PatchDataset, refs: torch.Tensor):
        if refs.shape[0] != len(base):
            raise ValueError(f"{refs.shape[0]} reference embeddings for {len(base)} patches")
        self.base = base
        self.refs = refs.float().contiguous()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        return {"image": item["image"], "mask": item["mask"], "ref": self.refs[i],
                "labelled": bool(item.get("labelled", True)), "index": i}


def _same_folder(a: str | Path | None, b: str | Path) -> bool:
    try:
        return a is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def training_embeddings(
    dataset: PatchDataset,
    encoder_run: str | Path,
    encoder: ReferenceEncoder,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> torch.Tensor:
    """``(N, D)`` reference embeddings of ``dataset``'s patches, in dataset order.

    The encoder run's cache is used when it was built from the same dataset folder (patch ids
    alone could collide between datasets); patches it lacks are embedded with ``encoder``.
    """
    cache: dict[str, torch.Tensor] = {}
    enc_cfg_path = Path(encoder_run) / "config.json"
    try:
        enc_data = json.loads(enc_cfg_path.read_text()).get("data") if enc_cfg_path.is_file() else None
    except (OSError, json.JSONDecodeError):
        enc_data = None
    if _same_folder(enc_data, dataset.root):
        try:
            cache = load_embeddings(encoder_run)
        except UserInputError:
            cache = {}
    ids = dataset.ids
    missing = [i for i, pid in enumerate(ids) if pid not in cache or cache[pid].shape != (encoder.embed_dim,)]
    computed: dict[int, torch.Tensor] = {}
    if missing:
        was = next(encoder.parameters()).device
        encoder.to(device)
        emb = embed_dataset(encoder, (dataset[i]["image"] for i in missing), batch_size=batch_size)
        encoder.to(was)
        computed = dict(zip(missing, emb))
    rows = [computed[i] if i in computed else cache[pid] for i, pid in enumerate(ids)]
    return torch.stack(rows).float() if rows else torch.zeros(0, encoder.embed_dim)


# --------------------------------------------------------------------------------------------
# one training step
# --------------------------------------------------------------------------------------------


def null_training_conditions(model: DSDMUNet, n: int, like_mask: torch.Tensor, like_ref: torch.Tensor) -> dict:
    """NULL conditions for the dropouts: the model's own (zero mask, learned ``null_ref``, eq. 17);
    a condition the architecture ignores gets zeros so every ablation shares one code path."""
    null = unwrap_model(model).null_conditions(n, like_mask.device)
    mask = null["mask"] if null["mask"] is not None else torch.zeros_like(like_mask)
    ref = null["ref"] if null["ref"] is not None else torch.zeros_like(like_ref)
    return {"mask": mask.to(like_mask.dtype), "ref": ref.to(like_ref.dtype)}


def training_conditions(
    model: nn.Module,
    x0: torch.Tensor,
    mask: torch.Tensor,
    ref: torch.Tensor,
    p_drop: tuple[float, float, float] = (0.0, 0.0, 0.0),
    generator: torch.Generator | None = None,
    labelled: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The conditions the network sees in one training step: ``({"mask": one-hot or NULL, "ref":
    embedding or NULL}, keep flags)``. Random dropouts as in :func:`drop_conditions`; then every
    unlabelled sample (``labelled`` False) gets the NULL mask and its keep flag cleared."""
    n = x0.shape[0]
    onehot = mask_one_hot(mask, unwrap_model(model).config.num_mask_classes).to(x0.dtype)
    cond = {"mask": onehot, "ref": ref.to(x0.dtype)}
    null = null_training_conditions(model, n, onehot, cond["ref"])
    mixed, keep = drop_conditions(cond, null, *p_drop, generator=generator)
    if labelled is not None:
        labelled = labelled.to(device=onehot.device, dtype=torch.bool).reshape(n)
        if not bool(labelled.all()):
            flag = labelled.reshape(n, 1, 1, 1)
            mixed["mask"] = torch.where(flag, mixed["mask"], null["mask"].expand_as(onehot))
            keep["mask"] = keep["mask"] & labelled.to(keep["mask"].device)
    return mixed, keep


def dsdm_loss(
    model: nn.Module,
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    mask: torch.Tensor,
    ref: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    lambda_vlb: float = 0.001,
    p_drop: tuple[float, float, float] = (0.0, 0.0, 0.0),
    generator: torch.Generator | None = None,
    labelled: torch.Tensor | None = None,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> dict[str, torch.Tensor]:
    """L_hybrid (eq. 14) of ``model`` on one batch, with classifier-free-guidance dropouts ``p_drop``
    = (mask only, reference only, both) drawn from ``generator``; returns ``loss``, ``mse``, ``vlb``
    (batch means) and ``kept_mask`` / ``kept_ref`` (fractions of samples that kept the condition).

    ``labelled`` (bool ``(N,)``, default all True): samples marked False have no mask; they get the
    NULL mask whatever the draw (their ``mask`` entries are ignored). ``loss_weighting="min_snr"``
    weights L_simple by :func:`~diffusiondci.diffusion.losses.min_snr_weights` (``mse`` stays the plain MSE)."""
    mixed, keep = training_conditions(model, x0, mask, ref, p_drop, generator, labelled)
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t, t, mask=mixed["mask"], ref=mixed["ref"])
    weights = min_snr_weights(schedule, t, min_snr_gamma) if loss_weighting == "min_snr" else None
    terms = hybrid_loss(schedule, out, x0, x_t, t, noise, lambda_vlb=lambda_vlb, reduction="mean",
                        mse_weights=weights)
    terms["kept_mask"] = keep["mask"].float().mean()
    terms["kept_ref"] = keep["ref"].float().mean()
    return terms


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _dataset_record(dataset: PatchDataset, image_size: int) -> dict[str, Any]:
    meta = dataset.meta
    return {
        "path": str(dataset.root.resolve()),
        "patch_size": image_size,
        "num_train_patches": len(dataset),
        "num_labelled_train_patches": dataset.num_labelled,
        "num_unlabelled_train_patches": len(dataset) - dataset.num_labelled,
        "classes": meta.get("classes"),
        # colour statistics the generator was trained on (references are mapped to them at sampling)
        "color_norm": meta.get("color_norm"),
    }


def _write_run_files(run_dir: Path, record: dict[str, Any], encoder_run: Path | None) -> None:
    write_run_record(run_dir, DSDM_META, record)
    if encoder_run is not None:
        shutil.copytree(encoder_run / ENCODER_DIR, run_dir / ENCODER_DIR, dirs_exist_ok=True)


def train_dsdm(
    data: str | Path,
    run_dir: str | Path,
    cfg: DSDMConfig,
    encoder_run: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Path:
    """Train DSDM on the ``train`` split of dataset ``data`` into ``run_dir``; returns ``run_dir``.

    ``encoder_run`` (a ``train-encoder`` run folder) is required unless ``cfg.use_reference`` is
    False. ``resume`` continues the run in ``run_dir`` (same settings; ``steps`` may grow).
    With ``cfg.use_unlabelled`` the unlabelled training patches join (NULL mask; see the module
    docstring); their mask files are never read.
    """
    data, run_dir = Path(data), Path(run_dir)
    preflight_run_folder(run_dir, "dsdm", resume)  # a wrong --out / --resume fails before any work
    if cfg.use_reference and encoder_run is None:
        raise UserInputError("the reference-conditioned DSDM needs --encoder RUN (or pass --no-reference)")
    dataset = PatchDataset(data, splits=("train",), with_masks=True, labelled_only=not cfg.use_unlabelled)
    if len(dataset) == 0 or (dataset.num_labelled == 0 and cfg.decoder_norm == "spade"):
        raise UserInputError("the dataset has no labelled training patches (the mask-conditioned DSDM "
                             "needs some)", data)
    image = dataset[0]["image"]
    if image.shape[-1] != image.shape[-2]:
        raise UserInputError(f"patches must be square, got {image.shape[-1]}x{image.shape[-2]}", dataset.image_path(0))
    image_size = int(image.shape[-1])

    info = dist_utils.init_distributed(device)
    encoder: ReferenceEncoder | None = None
    enc_path: Path | None = None
    ref_dim = None
    if cfg.use_reference:
        enc_path = Path(encoder_run)  # type: ignore[arg-type]
        encoder, _ = load_encoder_run(enc_path)
        ref_dim = encoder.embed_dim
    unet_cfg = build_unet_config(cfg, image_size=image_size, ref_dim=ref_dim)
    if encoder is not None:
        refs = training_embeddings(dataset, enc_path, encoder, info.device)  # type: ignore[arg-type]
    else:
        refs = torch.zeros(len(dataset), unet_cfg.ref_dim)
    train_set = ReferencedPatches(dataset, refs)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every resumed run
    model = DSDMUNet(unet_cfg)
    schedule = DiffusionSchedule(cfg.num_timesteps, cfg.noise_schedule)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, info.rank, 7))
    p_drop = (cfg.p_drop_mask, cfg.p_drop_ref, cfg.p_drop_both)

    def step_fn(m: nn.Module, batch: dict, step: int) -> dict:
        x0, mask = random_dihedral([batch["image"], batch["mask"]], cfg.augment, generator=noise_gen)
        n = x0.shape[0]
        t = timestep_sampler(n, schedule.num_timesteps, generator=noise_gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=noise_gen).to(x0.device)
        return dsdm_loss(m, schedule, x0, mask, batch["ref"], t, noise, cfg.lambda_vlb, p_drop, noise_gen,
                         labelled=batch["labelled"], loss_weighting=cfg.loss_weighting,
                         min_snr_gamma=cfg.min_snr_gamma)

    sample_fn = _make_sample_fn(train_set, schedule, cfg) if cfg.sample_every else None
    batch_size = min(cfg.batch_size, len(dataset))
    precision = resolve_autocast(cfg.autocast, info.device)
    trainer = Trainer(
        run_dir, model, optimizer, train_set, batch_size, step_fn, cfg.steps, seed=cfg.seed,
        scheduler=make_lr_scheduler(optimizer, cfg.lr_schedule, cfg.steps, cfg.lr_warmup, cfg.lr_min_ratio),
        # ``steps`` is left out so that a finished run can be extended with --resume --steps N
        config={
            "stage": "dsdm",
            "data": str(data.resolve()),
            "encoder": str(enc_path.resolve()) if enc_path is not None else None,
            "unet_resolved": unet_cfg.to_dict(),
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "num_workers")},
        },
        ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, sample_fn=sample_fn,
        sample_every=cfg.sample_every or None, resume=resume, grad_clip=cfg.grad_clip, device=device,
        num_workers=cfg.num_workers, autocast=precision, progress=progress,
        generators={"dsdm_noise": noise_gen},
    )
    if trainer.is_main:
        record = {
            "format": DSDM_FORMAT,
            "version": DSDM_VERSION,
            "unet": unet_cfg.to_dict(),
            "schedule": {"num_timesteps": cfg.num_timesteps, "noise_schedule": cfg.noise_schedule},
            "training": {
                "lambda_vlb": cfg.lambda_vlb,
                "p_drop_mask": cfg.p_drop_mask,
                "p_drop_ref": cfg.p_drop_ref,
                "p_drop_both": cfg.p_drop_both,
                "ema_decay": cfg.ema_decay,
                "ema_warmup": cfg.ema_warmup,
                "lr": cfg.lr,
                "lr_schedule": cfg.lr_schedule,
                "lr_warmup": cfg.lr_warmup,
                "augment": cfg.augment,
                "loss_weighting": cfg.loss_weighting,
                "precision": precision or "fp32",
                "batch_size": batch_size,
                "seed": cfg.seed,
                "use_unlabelled": cfg.use_unlabelled,
            },
            "encoder": {"dir": ENCODER_DIR, "source_run": str(enc_path.resolve())} if enc_path is not None else None,
            "data": _dataset_record(dataset, image_size),
        }
        _write_run_files(run_dir, record, enc_path)
    dist_utils.barrier()
    trainer.fit()
    return run_dir


def _make_sample_fn(train_set: ReferencedPatches, schedule: DiffusionSchedule, cfg: DSDMConfig):
    """Periodic samples (rank 0, EMA weights): DDIM on the first labelled training masks, one column
    per guidance scale in ``cfg.sample_guidance`` (same noise), after the mask and the real patch."""
    # unlabelled patches have no mask to sample from (all patches when none is labelled: no-mask ablation)
    order = [i for i, flag in enumerate(train_set.base.labelled) if flag] or list(range(len(train_set)))

    def sample_fn(model: nn.Module, step: int, out_dir: Path) -> None:
        from ..data.imageio import write_png_atomic
        from ..data.preview import colour_mask
        from ..diffusion.generate import generate
        from ..diffusion.picture_grid import make_grid

        k = min(cfg.sample_count, len(order))
        items = [train_set[i] for i in order[:k]]
        masks = torch.stack([it["mask"] for it in items])
        refs = torch.stack([it["ref"] for it in items])
        columns = [
            generate(model, schedule, masks, refs, sampler="ddim", steps=cfg.sample_steps, guidance=s,
                     seed=cfg.seed, batch_size=k, autocast=cfg.autocast)
            for s in cfg.sample_guidance
        ]
        rows = [
            [colour_mask(it["mask"].numpy()), to_uint8_image(it["image"])] + [to_uint8_image(c[i]) for c in columns]
            for i, it in enumerate(items)
        ]
        write_png_atomic(out_dir / "samples.png", make_grid(rows))

    return sample_fn
