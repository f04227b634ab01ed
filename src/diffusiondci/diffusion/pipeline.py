"""``diffusiondci sample``: generate DCI patches from semantic masks (+ reference images) with DSDM.

Three layers (diffusers-style: model, sampler and pipeline kept apart):

* :func:`load_dsdm` rebuilds a trained DSDM from its run folder (``dsdm.json`` + EMA weights of a
  checkpoint + the copied reference encoder); weights from another architecture or preset are
  rejected with a :class:`~diffusiondci.errors.UserInputError` listing the offending keys.
* :func:`generate` runs DDPM or DDIM (:mod:`.samplers`) with classifier-free guidance (eq. 17,
  :func:`.guidance.cfg_model_fn`, s = 3 by default) on label masks and reference embeddings. Batch
  ``b`` (of ``batch_size`` samples, in input order) draws all its noise from a CPU
  ``torch.Generator`` seeded with ``derive(seed, b)``: the same seed and batch size give the same
  images bit for bit, on any device for the initial noise.
* :func:`sample_to_folder` reads masks (a folder of label PNGs or a dataset folder), picks
  references, writes the generated patches in the dataset layout (``images/``, ``masks/``,
  ``manifest.csv``, ``dataset.json``; :class:`~diffusiondci.data.patch_dataset.PatchDataset` opens
  it), a contact sheet (mask | reference | samples) and a denoising-progression strip (x_t during
  sampling, like the paper's Fig. 5). An interrupted run resumes: finished batches are skipped.

References, in order of precedence: ``references`` = a folder of images (``<mask id>.*`` if present,
else the folder's images in turn, in name order); the paired image when the masks come from a dataset;
otherwise random patches of the model's training split (seeded). Folder references (and those of a
dataset that was not colour-normalised) are mapped with the modified Reinhard transfer to the
colour target recorded in the model run, and resized to the model's patch size.
For a model without reference conditioning references are not used; for the unconditional
baseline (no mask, no reference) the guidance scale is ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import CLASS_NAMES, __version__
from ..data.imageio import IMAGE_SUFFIXES, read_mask, read_rgb, write_json_atomic, write_png_atomic
from ..data.patch_dataset import PatchDataset, read_dataset_meta, to_tensor_image, to_uint8_image
from ..data.prepare import DATASET_FORMAT, MANIFEST_COLUMNS, class_fractions, write_manifest
from ..data.preview import colour_mask  # paper Fig. 5 colours
from ..device import resolve_device
from ..errors import UserInputError
from ..models.conditions import mask_one_hot
from ..models.embedding import embed_dataset
from ..models.reference_encoder import ReferenceEncoder, load_encoder
from ..models.unet import DSDMUNet, UNetConfig
from ..runs.checkpoint import resolve_checkpoint
from ..runs.formats import DSDM_FORMAT, DSDM_META
from ..runs.record import read_run_record
from ..runs.seeds import derive_seed
from ..runs.weights import load_weights_safetensors
from .guidance import PAPER_GUIDANCE_SCALE, cfg_model_fn
from .samplers import DEFAULT_FRACTIONS, ModelFn, ddim_sample, ddpm_sample
from .schedule import DiffusionSchedule

__all__ = [
    "DSDMRun",
    "SAMPLERS",
    "SampleConfig",
    "batch_generator",
    "colour_mask",
    "generate",
    "guided_model_fn",
    "load_dsdm",
    "make_grid",
    "sample_to_folder",
]

SAMPLERS = ("ddpm", "ddim")
DDIM_DEFAULT_STEPS = 50
CONTACT_SHEET = "contact_sheet.png"
PROGRESSION = "progression.png"
GENERATION_MARKER = "generation.json"


# --------------------------------------------------------------------------------------------
# loading a model run
# --------------------------------------------------------------------------------------------


@dataclass
class DSDMRun:
    """What :func:`load_dsdm` found besides the network and the schedule."""

    run_dir: Path
    record: dict[str, Any]  # dsdm.json
    checkpoint: Path
    step: int | None
    encoder: ReferenceEncoder | None = None

    @property
    def image_size(self) -> int:
        return int(self.record["unet"]["image_size"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.record.get("data") or {})

    @property
    def color_norm(self) -> dict[str, Any] | None:
        return self.data.get("color_norm")


def _read_record(run_dir: Path) -> dict[str, Any]:
    record = read_run_record(run_dir, DSDM_META, DSDM_FORMAT, "DSDM", "train-dsdm")
    path = run_dir / DSDM_META
    for key in ("unet", "schedule"):
        if not isinstance(record.get(key), dict):
            raise UserInputError(f"'{key}' section missing; re-run train-dsdm --resume to rewrite it", path)
    return record


def load_dsdm(
    run_dir: str | Path,
    checkpoint: str = "latest",
    ema: bool = True,
    device: str | torch.device | None = None,
) -> tuple[DSDMUNet, DiffusionSchedule, DSDMRun]:
    """Rebuild a trained DSDM: ``(model in eval mode, training schedule, run info)``.

    ``checkpoint`` names a folder under ``checkpoints/`` (``latest``, ``best``, ``step_<N>``) or is a
    path to a checkpoint folder; ``ema`` loads the EMA weights (what sampling should use).
    """
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    cfg = UNetConfig.from_dict(record["unet"], run_dir / DSDM_META)
    model = DSDMUNet(cfg)
    if checkpoint == "best" and not (run_dir / "checkpoints" / "best").exists():
        checkpoint = "latest"  # DSDM training keeps no "best" (no validation score): use the last one
    named = run_dir / "checkpoints" / checkpoint
    ckpt_dir = named if named.exists() or not Path(checkpoint).is_dir() else Path(checkpoint)
    resolved = resolve_checkpoint(ckpt_dir)
    if resolved is None:
        raise UserInputError("no complete checkpoint here yet; train (or resume) the run first", ckpt_dir)
    load_weights_safetensors(model, resolved, strict=True, ema=ema)
    step = None
    try:
        step = int(json.loads((resolved / "meta.json").read_text())["step"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        pass
    sched = record["schedule"]
    schedule = DiffusionSchedule(int(sched.get("num_timesteps", 1000)), sched.get("noise_schedule", "cosine"))
    dev = resolve_device(device)
    encoder = None
    if cfg.use_reference:
        enc_dir = run_dir / ((record.get("encoder") or {}).get("dir") or "encoder")
        encoder, _ = load_encoder(enc_dir, map_location="cpu")
        if encoder.embed_dim != cfg.ref_dim:
            raise UserInputError(
                f"encoder embeds to {encoder.embed_dim} numbers but the U-Net expects {cfg.ref_dim}; "
                "the run's encoder/ folder was replaced", enc_dir,
            )
        encoder.to(dev).eval()
    model.to(dev).eval()
    return model, schedule, DSDMRun(run_dir=run_dir, record=record, checkpoint=resolved, step=step, encoder=encoder)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def guided_model_fn(
    model: DSDMUNet, masks: torch.Tensor, refs: torch.Tensor | None, guidance: float = PAPER_GUIDANCE_SCALE
) -> ModelFn:
    """``model_fn(x_t, t)`` for the samplers, conditioned on ``masks`` (labels ``(N, H, W)``) and
    ``refs`` (``(N, D)`` embeddings; None = NULL reference) with guidance scale ``guidance`` (eq. 17).

    Only the conditions the architecture uses take part (the null pass replaces exactly those);
    with none (the unconditional baseline) the guidance scale is ignored.
    """
    cfg = model.config
    dev = next(model.parameters()).device
    cond: dict[str, torch.Tensor] = {}
    null: dict[str, torch.Tensor] = {}
    if cfg.decoder_norm == "spade":
        cond["mask"] = mask_one_hot(masks.to(dev), cfg.num_mask_classes)
        null["mask"] = torch.zeros_like(cond["mask"][0])
    if cfg.use_reference:
        assert model.null_ref is not None
        null_ref = model.null_ref.detach()
        cond["ref"] = refs.to(dev, torch.float32) if refs is not None else null_ref.expand(masks.shape[0], -1)
        null["ref"] = null_ref
    if not cond or float(guidance) == 0.0:
        return lambda x, t: model(x, t, **cond)
    return cfg_model_fn(model, cond, null, float(guidance))


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise UserInputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def _generate_batch(
    model: DSDMUNet,
    schedule: DiffusionSchedule,
    masks: torch.Tensor,
    refs: torch.Tensor | None,
    sampler: str,
    steps: int | None,
    guidance: float,
    generator: torch.Generator,
    eta: float = 0.0,
    progress: bool | Callable[[int, int], None] = False,
    return_intermediates: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
):
    size = model.config.image_size
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (size, size):
        raise ValueError(f"masks must be (N, {size}, {size}) label maps, got {tuple(masks.shape)}")
    dev = next(model.parameters()).device
    fn = guided_model_fn(model, masks, refs, guidance)
    shape = (masks.shape[0], model.config.in_channels, size, size)
    kw: dict[str, Any] = dict(
        device=dev, progress=progress, return_intermediates=return_intermediates,
        intermediate_fractions=fractions, intermediate_kind="x_t",
    )
    if sampler == "ddpm":
        return ddpm_sample(fn, schedule, shape, generator, steps=steps, **kw)
    return ddim_sample(fn, schedule, shape, generator, steps=steps or DDIM_DEFAULT_STEPS, eta=eta, **kw)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator of batch ``batch_index`` of a run seeded with ``seed``."""
    return torch.Generator().manual_seed(derive_seed(int(seed), int(batch_index), 17))


@torch.no_grad()
def generate(
    model: DSDMUNet,
    schedule: DiffusionSchedule,
    masks: torch.Tensor,
    refs: torch.Tensor | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    guidance: float = PAPER_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool | Callable[[int, int], None] = False,
    eta: float = 0.0,
    return_intermediates: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
):
    """Generate one image per mask: ``(N, 3, H, W)`` float in [-1, 1] on the CPU.

    Args:
        masks: ``(N, H, W)`` integer labels at the model's patch size.
        refs: ``(N, D)`` reference embeddings (None: the NULL reference).
        sampler: ``"ddpm"`` (ancestral, learned variance) or ``"ddim"`` (eta = ``eta``).
        steps: sampling steps; None = all T for DDPM, 50 for DDIM (respaced otherwise).
        guidance: s of eq. 17 (0 = the conditional prediction alone).
        seed: batch ``b`` uses a CPU generator seeded from ``(seed, b)``.
        progress: passed to the sampler of each batch (True = tqdm bar, or ``fn(step, total)``).
        return_intermediates: also return the x_t snapshots at ``fractions`` of the run, each
            ``(N, 3, H, W)``.
    """
    _check_sampler(sampler)
    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    masks = torch.as_tensor(masks).long()
    if refs is not None and refs.shape[0] != masks.shape[0]:
        raise ValueError(f"{refs.shape[0]} references for {masks.shape[0]} masks")
    outs: list[torch.Tensor] = []
    snaps: list[list[torch.Tensor]] = []
    for b, start in enumerate(range(0, masks.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        res = _generate_batch(
            model, schedule, masks[sl], refs[sl] if refs is not None else None, sampler, steps, guidance,
            batch_generator(seed, b), eta, progress, return_intermediates, fractions,
        )
        if return_intermediates:
            res, s = res
            snaps.append(s)
        outs.append(res.detach().float().cpu())
    images = torch.cat(outs) if outs else torch.zeros(0, 3, model.config.image_size, model.config.image_size)
    if return_intermediates:
        return images, [torch.cat([s[k] for s in snaps]) for k in range(len(fractions))] if snaps else []
    return images


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------


def make_grid(rows: Sequence[Sequence[np.ndarray | None]], gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile ``H x W x 3`` uint8 pictures row by row (``None`` = a grey placeholder tile)."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("nothing to tile")
    h, w = tiles[0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + gap, 3), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            out[y : y + h, x : x + w] = 128 if tile is None else tile[:h, :w]
    return out


# --------------------------------------------------------------------------------------------
# folder pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    """Settings of ``diffusiondci sample`` (preset section ``sample:``)."""

    sampler: str = "ddim"
    steps: int | None = None  # None: all T for ddpm, 50 for ddim
    guidance: float = PAPER_GUIDANCE_SCALE  # s of eq. 17 (paper: 3)
    eta: float = 0.0  # DDIM eta
    seed: int = 0
    batch_size: int = 8
    num_samples: int = 1  # images per mask (ids <mask id>_s<k> when > 1)
    checkpoint: str = "latest"
    use_ema: bool = True
    normalize_references: bool = True  # map folder references to the training colour target
    contact_rows: int = 8
    strip_rows: int = 4
    strip_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)

    def __post_init__(self) -> None:
        _check_sampler(self.sampler)
        self.strip_fractions = tuple(float(f) for f in self.strip_fractions)
        if self.steps is not None and int(self.steps) < 1:
            raise UserInputError(f"sampling steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "num_samples"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0 or self.eta < 0:
            raise UserInputError("guidance scale and eta must be >= 0")


@dataclass
class _Source:
    id: str
    mask: np.ndarray  # uint8 H x W
    path: Path
    image_path: Path | None = None  # paired image (dataset input)
    row: dict[str, str] = field(default_factory=dict)


def _read_sources(masks: Path, size: int, split: str | None) -> tuple[list[_Source], dict | None]:
    """Masks (+ paired images) from a dataset folder or a folder of label images."""
    if (masks / "dataset.json").is_file():
        meta = read_dataset_meta(masks)
        ds = PatchDataset(masks, splits=split, with_masks=True, labelled_only=True, cache=False)
        out = []
        for i in range(len(ds)):
            path = ds.mask_path(i)
            mask = read_mask(path)
            _check_size(mask, size, path)
            out.append(_Source(ds.rows[i]["id"], mask, path, image_path=ds.image_path(i), row=ds.rows[i]))
        if not out:
            raise UserInputError(f"no labelled patches{f' in split {split!r}' if split else ''}", masks)
        return out, meta
    if split is not None:
        raise UserInputError("--split needs a dataset folder (with dataset.json) as --masks", masks)
    if not masks.is_dir():
        raise UserInputError("--masks must be a folder of mask images or a dataset folder", masks)
    files = sorted(p for p in masks.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"no mask images ({', '.join(IMAGE_SUFFIXES)}) found", masks)
    out = []
    for p in files:
        mask = read_mask(p)  # validates single channel and labels {0, 1, 2}
        _check_size(mask, size, p)
        out.append(_Source(p.stem, mask, p))
    return out, None


def _check_size(mask: np.ndarray, size: int, path: Path) -> None:
    if mask.shape != (size, size):
        raise UserInputError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} but the model generates {size}x{size} patches; "
            f"cut or resize the masks to {size} px (nearest neighbour)", path,
        )


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _colour_normaliser(info: DSDMRun, enabled: bool) -> Callable[[np.ndarray], np.ndarray]:
    norm = info.color_norm or {}
    if not enabled or not norm.get("enabled") or not norm.get("target"):
        return lambda rgb: rgb
    from ..data import color

    target = color.LabStats.from_dict(norm["target"], info.run_dir / DSDM_META)
    tissue = color.TissueConfig(**norm["tissue"]) if isinstance(norm.get("tissue"), dict) else None
    return lambda rgb: color.normalize_image(rgb, target, tissue)


def _pick_references(
    sources: list[_Source],
    references: Path | None,
    masks_meta: dict | None,
    info: DSDMRun,
    cfg: SampleConfig,
) -> tuple[list[Path], list[str], str, Callable[[Path], np.ndarray]]:
    """One reference image per source: its path, its name, the mode used and a loader that returns
    it as the model sees it (uint8 at the model's patch size, colour-normalised where needed)."""
    size = info.image_size
    normalise = _colour_normaliser(info, cfg.normalize_references)
    if references is not None:
        if not references.is_dir():
            raise UserInputError("--references must be a folder of images", references)
        files = sorted(p for p in references.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", references)
        by_stem = {p.stem: p for p in files}
        chosen, unmatched = [], 0
        for s in sources:  # same name if there is one, else the folder's images in turn
            if s.id in by_stem:
                chosen.append(by_stem[s.id])
            else:
                chosen.append(files[unmatched % len(files)])
                unmatched += 1
        return chosen, [p.name for p in chosen], "folder", lambda p: normalise(_resize_rgb(read_rgb(p), size))
    if masks_meta is not None:
        was_normalised = bool((masks_meta.get("color_norm") or {}).get("enabled"))
        paths: list[Path] = [s.image_path for s in sources if s.image_path is not None]
        paired = normalise if not was_normalised else (lambda rgb: rgb)
        return paths, [s.id for s in sources], "paired", lambda p: paired(_resize_rgb(read_rgb(p), size))
    data_path = info.data.get("path")
    if not data_path or not (Path(data_path) / "dataset.json").is_file():
        raise UserInputError(
            f"the model's training data ({data_path}) is not available for random references; "
            "pass --references DIR", info.run_dir / DSDM_META,
        )
    train = PatchDataset(data_path, splits=("train",), with_masks=False, labelled_only=False, cache=False)
    if len(train) == 0:
        raise UserInputError("the training split is empty; pass --references DIR", data_path)
    rng = np.random.default_rng(derive_seed(cfg.seed, 23))
    idx = [int(i) for i in rng.integers(0, len(train), size=len(sources))]
    return ([train.image_path(i) for i in idx], [train.ids[i] for i in idx], "training-random",
            lambda p: _resize_rgb(read_rgb(p), size))


def _params_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_out(out: Path, params_hash: str) -> None:
    marker = out / GENERATION_MARKER
    if out.exists() and not out.is_dir():
        raise UserInputError("is a file; choose an output folder", out)
    if out.is_dir() and any(out.iterdir()):
        try:
            existing = json.loads(marker.read_text()).get("parameters_hash") if marker.is_file() else None
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing != params_hash:
            raise UserInputError(
                "output folder holds other files or a generation with other settings; choose another --out", out
            )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json_atomic(marker, {"parameters_hash": params_hash})


def sample_to_folder(
    model_run: str | Path,
    masks: str | Path,
    out: str | Path,
    cfg: SampleConfig | None = None,
    references: str | Path | None = None,
    split: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate ``cfg.num_samples`` patches per mask into dataset folder ``out``; returns ``out``.

    See the module docstring for the inputs, the references and the files written.
    """
    cfg = cfg or SampleConfig()
    model_run, masks, out = Path(model_run), Path(masks), Path(out)
    references = Path(references) if references is not None else None
    model, schedule, info = load_dsdm(model_run, cfg.checkpoint, ema=cfg.use_ema, device=device)
    size = info.image_size
    sources, masks_meta = _read_sources(masks, size, split)
    uses_ref = model.config.use_reference
    ref_paths: list[Path] = []
    ref_names = [""] * len(sources)
    ref_mode = "none"
    load_ref: Callable[[Path], np.ndarray] | None = None
    if uses_ref:
        ref_paths, ref_names, ref_mode, load_ref = _pick_references(sources, references, masks_meta, info, cfg)

    # flatten: each mask num_samples times
    k = cfg.num_samples
    jobs = [(s_i, j) for s_i in range(len(sources)) for j in range(k)]
    sample_ids = [sources[s].id if k == 1 else f"{sources[s].id}_s{j}" for s, j in jobs]
    if len(set(sample_ids)) != len(sample_ids):
        raise UserInputError("two masks share one id (file stem); rename them", masks)
    default_steps = schedule.num_timesteps if cfg.sampler == "ddpm" else DDIM_DEFAULT_STEPS
    steps = cfg.steps if cfg.steps is not None else default_steps
    params = {
        "model": str(model_run.resolve()), "checkpoint": str(info.checkpoint.resolve()), "step": info.step,
        "sampler": cfg.sampler, "steps": steps, "guidance": cfg.guidance, "eta": cfg.eta, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "num_samples": k, "use_ema": cfg.use_ema, "references": ref_mode,
        "normalize_references": cfg.normalize_references,
    }
    payload = {**params, "masks": str(masks.resolve()), "split": split,
               "references_dir": str(references.resolve()) if references else None, "ids": sample_ids,
               "reference_ids": ref_names}
    params_hash = _params_hash(payload)
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("parameters_hash") == params_hash:
                log(f"{out} already holds this generation; nothing to do")
                return out
        except (OSError, json.JSONDecodeError):
            pass
    _prepare_out(out, params_hash)

    refs_emb = None
    if uses_ref:
        assert info.encoder is not None
        assert load_ref is not None
        unique = list(dict.fromkeys(ref_paths))  # each reference image is read and embedded once
        emb = embed_dataset(info.encoder, (to_tensor_image(load_ref(p)) for p in unique), batch_size=64)
        row_of = {p: i for i, p in enumerate(unique)}
        refs_emb = torch.stack([emb[row_of[ref_paths[s]]] for s, _ in jobs])
    all_masks = torch.stack([torch.from_numpy(sources[s].mask) for s, _ in jobs])  # uint8: 1 byte / pixel

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="sampling", unit="img", leave=False)
    strip_path = out / PROGRESSION
    for b, start in enumerate(range(0, len(jobs), cfg.batch_size)):
        sl = slice(start, start + cfg.batch_size)
        ids = sample_ids[sl]
        want_strip = b == 0 and not strip_path.is_file()
        done = all((out / "images" / f"{i}.png").is_file() and (out / "masks" / f"{i}.png").is_file() for i in ids)
        if done and not want_strip:
            if bar is not None:
                bar.update(len(ids))
            continue
        with torch.no_grad():
            res = _generate_batch(
                model, schedule, all_masks[sl].long(), refs_emb[sl] if refs_emb is not None else None, cfg.sampler,
                steps, cfg.guidance, batch_generator(cfg.seed, b), cfg.eta,
                return_intermediates=want_strip, fractions=cfg.strip_fractions,
            )
        if want_strip:
            res, snaps = res
            n = min(cfg.strip_rows, res.shape[0])
            rows = [[colour_mask(all_masks[i].numpy()), *(to_uint8_image(s[i]) for s in snaps)] for i in range(n)]
            write_png_atomic(strip_path, make_grid(rows))
        for i, sid in enumerate(ids):
            write_png_atomic(out / "masks" / f"{sid}.png", all_masks[start + i].numpy())
            write_png_atomic(out / "images" / f"{sid}.png", to_uint8_image(res[i]))
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()

    # contact sheet: mask | reference | samples, from the written files (also after a resume)
    rows_pic = []
    for s_i in range(min(cfg.contact_rows, len(sources))):
        sids = [sample_ids[s_i * k + j] for j in range(k)]
        ref_pic = load_ref(ref_paths[s_i]) if load_ref is not None else None
        rows_pic.append([colour_mask(sources[s_i].mask), ref_pic,
                         *(read_rgb(out / "images" / f"{sid}.png") for sid in sids)])
    if rows_pic:
        write_png_atomic(out / CONTACT_SHEET, make_grid(rows_pic))

    _write_manifest_and_meta(out, sources, jobs, sample_ids, ref_names, size, params, payload, params_hash, info)
    log(f"wrote {len(jobs)} generated patches to {out} (images/, masks/, {CONTACT_SHEET}, {PROGRESSION})")
    return out


def _write_manifest_and_meta(
    out: Path,
    sources: list[_Source],
    jobs: list[tuple[int, int]],
    sample_ids: list[str],
    ref_names: list[str],
    size: int,
    params: dict[str, Any],
    payload: dict[str, Any],
    params_hash: str,
    info: DSDMRun,
) -> None:
    columns = (*MANIFEST_COLUMNS, "source_id", "sample_index", "reference")
    rows = []
    for (s_i, j), sid in zip(jobs, sample_ids):
        src = sources[s_i]
        rows.append({
            "id": sid, "slide": src.row.get("slide", src.id), "group": src.row.get("group", src.id),
            # generated from a dataset's masks: keep the source split; plain mask folders -> train
            "split": src.row.get("split") or "train", "x": 0, "y": 0, "roi_size": size, "patch_size": size,
            "tissue_fraction": "", **class_fractions(src.mask), "labelled": 1,
            "source_id": src.id, "sample_index": j, "reference": ref_names[s_i],
        })
    counts = write_manifest(out, rows, columns=columns)
    write_json_atomic(out / "dataset.json", {  # written last: its presence marks a complete folder
        "format": DATASET_FORMAT,
        "diffusiondci_version": __version__,
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "num_patches": len(rows),
        "splits": counts,
        "parameters": {"generated": True, **params},
        "parameters_hash": params_hash,
        "source": {"masks": payload["masks"], "split": payload["split"], "references": payload["references_dir"]},
        # generated patches follow the colour statistics the model was trained on
        "color_norm": info.color_norm or {"enabled": False, "target_mode": None, "target": None, "slide_targets": {}},
    })

