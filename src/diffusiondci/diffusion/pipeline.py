"""``diffusiondci sample``: generate DCI patches from semantic masks (+ reference images) with DSDM.

Three layers (diffusers-style: model, sampler and pipeline kept apart): :mod:`.dsdm_run` loads the
trained DSDM, :mod:`.generate` runs guided DDPM / DDIM seeded batch by batch, and this module is
the pipeline.

:func:`sample_to_folder` reads masks (a folder of label PNGs or a dataset folder) and picks
references (:mod:`.sample_inputs`, which also says how references are chosen and colour-mapped),
writes the generated patches in the dataset layout (``images/``, ``masks/``, ``manifest.csv``,
``dataset.json``; :class:`~diffusiondci.data.patch_dataset.PatchDataset` opens it), a contact sheet
(mask | reference | samples) and a denoising-progression strip (x_t during sampling, like the
paper's Fig. 5). An interrupted run resumes: finished batches are skipped. For a model without
reference conditioning references are not used; for the unconditional baseline (no mask, no
reference) the guidance scale is ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import CLASS_NAMES, __version__
from ..data.imageio import read_rgb, write_json_atomic, write_png_atomic
from ..data.patch_dataset import to_tensor_image, to_uint8_image
from ..data.prepare import DATASET_FORMAT, MANIFEST_COLUMNS, class_fractions, write_manifest
from ..data.preview import colour_mask  # paper Fig. 5 colours
from ..device import AUTOCAST_CHOICES, resolve_autocast
from ..errors import UserInputError
from ..models.embedding import embed_dataset
from .dsdm_run import DSDMRun, load_dsdm
from .generate import DDIM_DEFAULT_STEPS, batch_generator, check_sampler, generate_batch
from .guidance import PAPER_GUIDANCE_SCALE
from .picture_grid import make_grid
from .sample_inputs import MaskSource, pick_references, read_sources

__all__ = ["GENERATION_MARKER", "SampleConfig", "sample_to_folder"]

CONTACT_SHEET = "contact_sheet.png"
PROGRESSION = "progression.png"
GENERATION_MARKER = "generation.json"


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
    autocast: str | None = None  # network precision: auto (bf16 where native) | bf16 | fp32 (None = fp32)

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        if self.autocast not in (None, *AUTOCAST_CHOICES):
            raise UserInputError(f"sample.autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {self.autocast!r}")
        self.strip_fractions = tuple(float(f) for f in self.strip_fractions)
        if self.steps is not None and int(self.steps) < 1:
            raise UserInputError(f"sampling steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "num_samples"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0 or self.eta < 0:
            raise UserInputError("guidance scale and eta must be >= 0")


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
    sources, masks_meta = read_sources(masks, size, split)
    uses_ref = model.config.use_reference
    ref_paths: list[Path] = []
    ref_names = [""] * len(sources)
    ref_mode = "none"
    load_ref: Callable[[Path], np.ndarray] | None = None
    if uses_ref:
        ref_paths, ref_names, ref_mode, load_ref = pick_references(
            sources, references, masks_meta, info, cfg.normalize_references, cfg.seed
        )

    # flatten: each mask num_samples times
    k = cfg.num_samples
    jobs = [(s_i, j) for s_i in range(len(sources)) for j in range(k)]
    sample_ids = [sources[s].id if k == 1 else f"{sources[s].id}_s{j}" for s, j in jobs]
    if len(set(sample_ids)) != len(sample_ids):
        raise UserInputError("two masks share one id (file stem); rename them", masks)
    precision = resolve_autocast(cfg.autocast, next(model.parameters()).device)
    default_steps = schedule.num_timesteps if cfg.sampler == "ddpm" else DDIM_DEFAULT_STEPS
    steps = cfg.steps if cfg.steps is not None else default_steps
    params = {
        "model": str(model_run.resolve()), "checkpoint": str(info.checkpoint.resolve()), "step": info.step,
        "sampler": cfg.sampler, "steps": steps, "guidance": cfg.guidance, "eta": cfg.eta, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "num_samples": k, "use_ema": cfg.use_ema, "references": ref_mode,
        "normalize_references": cfg.normalize_references, "precision": precision or "fp32",
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
        from ..progress import progress_bar  # a bar on a terminal, plain lines in a log

        bar = progress_bar(len(jobs), "sampling", unit="image", leave=False)
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
            res = generate_batch(
                model, schedule, all_masks[sl].long(), refs_emb[sl] if refs_emb is not None else None, cfg.sampler,
                steps, cfg.guidance, batch_generator(cfg.seed, b), cfg.eta,
                return_intermediates=want_strip, fractions=cfg.strip_fractions, precision=precision,
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
    sources: list[MaskSource],
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
