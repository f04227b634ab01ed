"""The training commands: ``train-encoder`` (SimCLR reference encoder), ``train-dsdm`` (the
generator) and ``train-seg`` (the segmenter or the plain U-Net baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import PRESETS, load_section
from ..errors import UserInputError
from .common import (
    DEFAULT_PRESET,
    PresetOpt,
    _at_least,
    _build,
    _from_preset,
    _ints,
    _outputs,
    _positive,
    _preset_value,
    app,
)


def _seg_steps_default() -> str:
    parts = []
    for name in PRESETS:
        steps, epochs = _preset_value(name, "seg", "steps"), _preset_value(name, "seg", "epochs")
        parts.append(f"{name} {steps if steps is not None else f'{epochs} epochs'}")
    return "from preset: " + "; ".join(parts)


@app.command("train-encoder")
def train_encoder_cmd(
    data: Annotated[Path, typer.Argument(help="Patch dataset folder (from prepare or import-patches).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: new or empty (or this run, with --resume).")],
    preset: PresetOpt = DEFAULT_PRESET,
    steps: Annotated[Optional[int], typer.Option(help="Training iterations.", show_default=_from_preset("encoder", "steps"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process.", show_default=_from_preset("encoder", "batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate.", show_default=_from_preset("encoder", "lr"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", show_default=_from_preset("encoder", "seed"))] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (an error if there is none).")] = False,
    no_unlabelled: Annotated[bool, typer.Option("--no-unlabelled", help="Train on labelled patches only (default: unlabelled ones too).")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
) -> None:
    """Train the ResNet-18 reference encoder with SimCLR and cache patch embeddings."""
    from ..train.encoder import EncoderConfig, train_encoder

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _positive("--lr", lr)
    cfg = _build(EncoderConfig, load_section(preset, "encoder"), "encoder", {"use_unlabelled": "--no-unlabelled"},
                 steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 use_unlabelled=False if no_unlabelled else None)
    run = train_encoder(data, out, cfg, resume=resume, device=device)
    typer.echo(f"encoder run: {run} ({_outputs(run, ('encoder', 'embeddings.safetensors', 'log.csv'))})")


@app.command("train-dsdm")
def train_dsdm_cmd(
    data: Annotated[Path, typer.Argument(help="Patch dataset folder (from prepare or import-patches).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: new or empty (or this run, with --resume).")],
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="train-encoder run folder (reference embeddings); not needed with --no-reference.")] = None,
    preset: PresetOpt = DEFAULT_PRESET,
    steps: Annotated[Optional[int], typer.Option(help="Training iterations (the paper: 50000).", show_default=_from_preset("dsdm", "steps"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process (the paper: 10).", show_default=_from_preset("dsdm", "batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam peak learning rate (the paper: 1e-4).", show_default=_from_preset("dsdm", "lr"))] = None,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Ablation: GroupNorm decoder, no semantic mask.")] = False,
    no_reference: Annotated[bool, typer.Option("--no-reference", help="Ablation: no reference image (no MCAA, no encoder).")] = False,
    guidance_drop: Annotated[Optional[float], typer.Option("--guidance-drop", help="Classifier-free guidance: probability of each dropout case (mask only, reference only, both).", show_default=_from_preset("dsdm", "p_drop_mask", "p_drop_ref", "p_drop_both"))] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Write DDIM samples every N steps (0 = off).", show_default=_from_preset("dsdm", "sample_every"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", show_default=_from_preset("dsdm", "seed"))] = None,
    autocast: Annotated[Optional[str], typer.Option(help="Training precision: auto (bf16 autocast where the CPU/GPU computes bf16 natively, else fp32) | bf16 | fp32.", show_default=_from_preset("dsdm", "autocast", none="fp32"))] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (an error if there is none).")] = False,
    no_unlabelled: Annotated[bool, typer.Option("--no-unlabelled", help="Train on labelled patches only (default: unlabelled ones too, with the NULL mask).")] = False,
) -> None:
    """Train the DSDM generator (semantic mask + reference image guidance, hybrid loss)."""
    from ..train.dsdm import DSDMConfig, train_dsdm

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _positive("--lr", lr)
    _at_least("--sample-every", sample_every, 0)
    cfg = _build(
        DSDMConfig, load_section(preset, "dsdm"), "dsdm",
        {"decoder_norm": "--no-mask", "use_reference": "--no-reference", "p_drop_mask": "--guidance-drop",
         "p_drop_ref": "--guidance-drop", "p_drop_both": "--guidance-drop", "use_unlabelled": "--no-unlabelled"},
        steps=steps, batch_size=batch_size, lr=lr, sample_every=sample_every, seed=seed, autocast=autocast,
        decoder_norm="group" if no_mask else None, use_reference=False if no_reference else None,
        p_drop_mask=guidance_drop, p_drop_ref=guidance_drop, p_drop_both=guidance_drop,
        use_unlabelled=False if no_unlabelled else None,
    )
    run = train_dsdm(data, out, cfg, encoder_run=encoder, resume=resume, device=device)
    typer.echo(f"DSDM run: {run} ({_outputs(run, ('dsdm.json', 'checkpoints/latest', 'log.csv'))})")


@app.command("train-seg")
def train_seg_cmd(
    data: Annotated[Path, typer.Argument(help="Patch dataset folder (real images; val/test splits are used for scoring).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: new or empty (or this run, with --resume).")],
    dsdm: Annotated[Optional[Path], typer.Option("--dsdm", help="train-dsdm run: frozen feature source and initial weights.")] = None,
    injection: Annotated[Optional[str], typer.Option(help="DSDM feature injection: none | skip | caa (Table 5).", show_default=_from_preset("seg", "injection"))] = None,
    init: Annotated[Optional[str], typer.Option(help="Backbone initialisation: dsdm | scratch.", show_default=_from_preset("seg", "init"))] = None,
    preset: PresetOpt = DEFAULT_PRESET,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (replaces the preset's steps or epochs).", show_default=_seg_steps_default())] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process (the paper: 12).", show_default=_from_preset("seg", "batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (the paper: 1e-3).", show_default=_from_preset("seg", "lr"))] = None,
    blocks: Annotated[Optional[str], typer.Option(help="DSDM decoder blocks to inject, comma-separated; they must exist in the DSDM (`diffusiondci probe` ranks them).", show_default=_from_preset("seg", "blocks"))] = None,
    timesteps: Annotated[Optional[str], typer.Option(help="DSDM timesteps of the features, comma-separated, 0-based.", show_default=_from_preset("seg", "timesteps"))] = None,
    synthetic: Annotated[Optional[Path], typer.Option(help="Folder written by `diffusiondci sample` (synthetic pairs).")] = None,
    synthetic_ratio: Annotated[Optional[float], typer.Option(help="Synthetic pairs added = ratio x real training images (Fig. 6).", show_default=_from_preset("seg", "synthetic_ratio"))] = None,
    filter_model: Annotated[Optional[Path], typer.Option(help="Segmenter run trained on real data, used to filter synthetic pairs.")] = None,
    filter_threshold: Annotated[Optional[float], typer.Option(help="Keep synthetic pairs whose mean Dice under --filter-model is at least this.", show_default=_from_preset("seg", "filter_threshold", none="off"))] = None,
    labelled: Annotated[Optional[int], typer.Option(help="Keep the labels of only N annotated training slides (annotation budget; see --label-unit).", show_default=_from_preset("seg", "labelled", none="all"))] = None,
    label_seed: Annotated[Optional[int], typer.Option(help="Seed of the --labelled draw.", show_default=_from_preset("seg", "label_seed"))] = None,
    label_unit: Annotated[Optional[str], typer.Option(help="What --labelled counts: slide (a source slide/image and all its patches) | patch.", show_default=_from_preset("seg", "label_unit"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", show_default=_from_preset("seg", "seed"))] = None,
    caa_window: Annotated[Optional[int], typer.Option(help="CAA: w (odd) = local attention over the w x w DSDM positions around each pixel; 0 = global CAA over pooled features.", show_default=_from_preset("seg", "caa_window"))] = None,
    feature_cache: Annotated[Optional[str], typer.Option(help="Frozen-DSDM feature cache: a folder | dsdm (<--dsdm run>/feature_cache) | off.", show_default=_from_preset("seg", "feature_cache"))] = None,
    autocast: Annotated[Optional[str], typer.Option(help="Training precision: auto (bf16 autocast where the CPU/GPU computes bf16 natively, else fp32) | bf16 | fp32.", show_default=_from_preset("seg", "autocast", none="fp32"))] = None,
    tta: Annotated[Optional[str], typer.Option(help="Test-time augmentation of the test scoring, kept as `segment`'s default: none | flip | dihedral (8 views).", show_default=_from_preset("seg", "tta"))] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (an error if there is none).")] = False,
) -> None:
    """Train the segmenter (DSDM backbone + CAA-injected diffusion features), or the plain U-Net baseline."""
    from ..train.seg_config import SegConfig
    from ..train.segmentation import train_seg

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _positive("--lr", lr)
    _at_least("--synthetic-ratio", synthetic_ratio, 0)
    overrides = dict(
        injection=injection, init=init, batch_size=batch_size, lr=lr, blocks=_ints(blocks),
        timesteps=_ints(timesteps), synthetic_ratio=synthetic_ratio, filter_threshold=filter_threshold,
        labelled=labelled, label_seed=label_seed, label_unit=label_unit, seed=seed, caa_window=caa_window,
        feature_cache=feature_cache, autocast=autocast, tta=tta,
    )
    if steps is not None:
        overrides["steps"] = steps
    values = load_section(preset, "seg")
    if steps is not None:
        values["epochs"] = None
    if synthetic is not None and synthetic_ratio is None and not values.get("synthetic_ratio"):
        raise UserInputError("--synthetic given without --synthetic-ratio; say how many synthetic pairs to add")
    cfg = _build(SegConfig, values, "seg", None, **overrides)
    run = train_seg(data, out, cfg, dsdm_run=dsdm, synthetic=synthetic, filter_model=filter_model,
                    resume=resume, device=device)
    written = _outputs(run, ("segmenter.json", "checkpoints/best", "checkpoints/latest", "test_metrics.json"))
    typer.echo(f"segmentation run: {run} ({written})")
