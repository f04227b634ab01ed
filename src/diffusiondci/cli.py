"""The ``diffusiondci`` command line: one subcommand per stage of the paper.

Each command is a thin call into its stage; errors a user can fix are printed as one line
(``error: <file>: <what to do>``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from . import __version__
from .config import PRESETS, build, load_section
from .errors import UserInputError

app = typer.Typer(
    help="DiffusionDCI: diffusion-based generation and segmentation of Dynamic Cell Imaging slides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: the one rule for the preset of every command that takes one: ``paper``, unless the environment
#: variable DIFFUSIONDCI_PRESET names another (``--preset`` always wins)
DEFAULT_PRESET = "paper"
PRESET_ENV = "DIFFUSIONDCI_PRESET"
PresetOpt = Annotated[str, typer.Option(
    "--preset", envvar=PRESET_ENV, show_default=f"{DEFAULT_PRESET}, or ${PRESET_ENV} when set",
    help="Config preset: tiny | paper | path to a YAML file. Options marked 'from preset' take its values.",
)]


@functools.cache
def _preset_value(preset: str, section: str, key: str) -> object:
    try:
        return load_section(preset, section).get(key)
    except UserInputError:
        return None


def _show(value: object, none: str) -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v, none) for v in value)
    return str(value)


def _from_preset(section: str, *keys: str, none: str = "auto") -> str:
    """Help text of the default of an option that overrides preset keys, e.g. ``from preset: tiny
    150, paper 20000`` (the values of several keys are joined by '/')."""
    parts = []
    for name in PRESETS:
        values = [_preset_value(name, section, k) for k in keys]
        parts.append(f"{name} {'/'.join(_show(v, none) for v in values)}")
    return "from preset: " + "; ".join(parts)


def _seg_steps_default() -> str:
    parts = []
    for name in PRESETS:
        steps, epochs = _preset_value(name, "seg", "steps"), _preset_value(name, "seg", "epochs")
        parts.append(f"{name} {steps if steps is not None else f'{epochs} epochs'}")
    return "from preset: " + "; ".join(parts)


def _at_least(flag: str, value: float | None, minimum: float) -> None:
    """A flag's value below ``minimum`` is an error that names the flag (not the preset key)."""
    if value is not None and not value >= minimum:
        raise UserInputError(f"{flag} must be at least {minimum}, got {value}")


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserInputError(f"{flag} must be greater than 0, got {value}")


def _build(cls: type, values: dict, section: str, flags: dict[str, str] | None = None, **overrides: object):
    """:func:`build` whose errors name the flag a value came from (``--lr``), not the preset key
    (``dsdm.lr``); ``flags`` maps keys to flags where the flag is not ``--<key with dashes>``."""
    try:
        return build(cls, values, **overrides)
    except UserInputError as exc:
        message = str(exc)
        for key, value in overrides.items():
            if value is not None:
                flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
                message = re.sub(rf"\b{re.escape(section)}\.{re.escape(key)}\b", flag, message)
        if message == str(exc):
            raise
        raise UserInputError(message) from None


def _outputs(run: Path, names: tuple[str, ...]) -> str:
    """The ones of ``names`` that exist in ``run`` (what a finished command reports)."""
    return ", ".join(n for n in names if (run / n).exists())


#: plain on/off switches (--resume, --help) take no value: typer 0.29 would show "<bool>" after them
_FLAG_TYPE = typer.core.TyperOption.display_type_rich


def _flag_type(self: typer.core.TyperOption, ctx: object) -> str | None:
    return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else _FLAG_TYPE(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _progress_factory(label: str, total: int):
    bar = tqdm(total=total or None, desc=label, unit="roi", leave=False, disable=None)

    def update(done: int, total_now: int) -> None:
        if bar.total != total_now:
            bar.total = total_now
        bar.n = done
        bar.refresh()
        if done >= total_now:
            bar.close()

    return update


@contextlib.contextmanager
def _one_line_warnings():
    """While a command runs, every Python warning is one line ``warning: <message>`` on stderr, each
    message once: no source line, no file:line prefix, no repeats (e.g. from several processes or
    code paths)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            typer.echo(f"warning: {text}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffusiondci {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Run `diffusiondci COMMAND --help` for the options of each step."""
    ctx.with_resource(_one_line_warnings())


@app.command()
def prepare(
    input_dir: Annotated[Path, typer.Argument(help="Folder of whole-slide images (TIFF, PNG, JPEG).")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    preset: PresetOpt = "paper",
    masks: Annotated[Optional[Path], typer.Option(help="Folder with <stem>_mask.png|.tif|.tiff or <stem>.geojson.")] = None,
    groups: Annotated[Optional[Path], typer.Option(help="CSV: slide stem, group id (e.g. patient).")] = None,
    class_map: Annotated[Optional[Path], typer.Option("--class-map", help="YAML/JSON: GeoJSON class name -> 0/1/2.")] = None,
    roi_size: Annotated[Optional[int], typer.Option(help="ROI side in slide pixels (paper 3450).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window step in pixels (paper 3450).")] = None,
    edge: Annotated[Optional[str], typer.Option(help="Border windows: drop | shift | pad.")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="ROIs are resized to this side (paper 256).")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="Acquisition tile side for colour normalisation.")] = None,
    no_color_norm: Annotated[bool, typer.Option("--no-color-norm", help="Turn colour normalisation off.")] = False,
    norm_target: Annotated[Optional[str], typer.Option(help="Normalise tiles to the slide's or the dataset's average: slide | dataset.")] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="Skip ROIs with a smaller tissue fraction.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of groups for validation.")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Fraction of groups for testing.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split.")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images with more pixels (decompression bombs).")] = None,
    unlabelled: Annotated[Optional[Path], typer.Option("--unlabelled", help="Folder of slides without annotation: cut and normalised like the others, no masks (manifest labelled=0).")] = None,
    allow_unlabelled: Annotated[bool, typer.Option("--allow-unlabelled", help="Use slides without an annotation as unlabelled instead of stopping.")] = False,
) -> None:
    """Cut colour-normalised ROI patches and masks from whole slides into a dataset folder."""
    from .data.prepare import PrepareConfig, prepare_dataset

    cfg = build(
        PrepareConfig, load_section(preset, "prepare"),
        roi_size=roi_size, stride=stride, edge=edge, patch_size=patch_size, tile_size=tile_size,
        color_norm=False if no_color_norm else None, norm_target=norm_target, min_tissue=min_tissue,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, max_pixels=max_pixels,
    )
    prepare_dataset(input_dir, out, cfg, masks_dir=masks, groups_csv=groups, class_map_file=class_map,
                    log=typer.echo, progress_factory=_progress_factory, unlabelled_dir=unlabelled,
                    allow_unlabelled=allow_unlabelled)


@app.command("import-patches")
def import_patches_cmd(
    source: Annotated[Path, typer.Argument(help="Folder with images/ and masks/ of already-cut patches.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    groups: Annotated[Optional[Path], typer.Option(help="CSV: patch id, group id (e.g. patient).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of groups for validation.")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Fraction of groups for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    allow_unlabelled: Annotated[bool, typer.Option("--allow-unlabelled", help="Import images without a mask file as unlabelled (manifest labelled=0).")] = False,
) -> None:
    """Validate already-cut patches and import them into the dataset layout (no resampling)."""
    from .data.import_patches import import_patches

    import_patches(source, out, groups_csv=groups, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, log=typer.echo, allow_unlabelled=allow_unlabelled)


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
    from .train.encoder import EncoderConfig, train_encoder

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
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (an error if there is none).")] = False,
    no_unlabelled: Annotated[bool, typer.Option("--no-unlabelled", help="Train on labelled patches only (default: unlabelled ones too, with the NULL mask).")] = False,
) -> None:
    """Train the DSDM generator (semantic mask + reference image guidance, hybrid loss)."""
    from .train.dsdm import DSDMConfig, train_dsdm

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _positive("--lr", lr)
    _at_least("--sample-every", sample_every, 0)
    cfg = _build(
        DSDMConfig, load_section(preset, "dsdm"), "dsdm",
        {"decoder_norm": "--no-mask", "use_reference": "--no-reference", "p_drop_mask": "--guidance-drop",
         "p_drop_ref": "--guidance-drop", "p_drop_both": "--guidance-drop", "use_unlabelled": "--no-unlabelled"},
        steps=steps, batch_size=batch_size, lr=lr, sample_every=sample_every, seed=seed,
        decoder_norm="group" if no_mask else None, use_reference=False if no_reference else None,
        p_drop_mask=guidance_drop, p_drop_ref=guidance_drop, p_drop_both=guidance_drop,
        use_unlabelled=False if no_unlabelled else None,
    )
    run = train_dsdm(data, out, cfg, encoder_run=encoder, resume=resume, device=device)
    typer.echo(f"DSDM run: {run} ({_outputs(run, ('dsdm.json', 'checkpoints/latest', 'log.csv'))})")


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserInputError(f"expected comma-separated integers, got {text!r}") from None


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
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (an error if there is none).")] = False,
) -> None:
    """Train the segmenter (DSDM backbone + CAA-injected diffusion features), or the plain U-Net baseline."""
    from .train.seg_config import SegConfig
    from .train.segmentation import train_seg

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _positive("--lr", lr)
    _at_least("--synthetic-ratio", synthetic_ratio, 0)
    overrides = dict(
        injection=injection, init=init, batch_size=batch_size, lr=lr, blocks=_ints(blocks),
        timesteps=_ints(timesteps), synthetic_ratio=synthetic_ratio, filter_threshold=filter_threshold,
        labelled=labelled, label_seed=label_seed, label_unit=label_unit, seed=seed, caa_window=caa_window,
        feature_cache=feature_cache,
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


@app.command()
def sample(
    model: Annotated[Path, typer.Option("--model", help="DSDM run folder (from train-dsdm).")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of label masks (.png, .tif, .tiff), or a dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (dataset layout: images/, masks/, manifest.csv).")],
    references: Annotated[Optional[Path], typer.Option("--references", help="Folder of reference images (matched by id, else taken in turn).")] = None,
    split: Annotated[Optional[str], typer.Option(help="With a dataset as --masks: use this split only.")] = None,
    preset: PresetOpt = DEFAULT_PRESET,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm | ddim.", show_default=_from_preset("sample", "sampler"))] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (auto: all T for ddpm, 50 for ddim).", show_default=_from_preset("sample", "steps"))] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale s of eq. 17 (the paper: 3).", show_default=_from_preset("sample", "guidance"))] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Images per mask.", show_default=_from_preset("sample", "num_samples"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same images).", show_default=_from_preset("sample", "seed"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per sampling batch.", show_default=_from_preset("sample", "batch_size"))] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="latest | step_N | a checkpoint folder (best = latest for DSDM runs).", show_default=_from_preset("sample", "checkpoint"))] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
) -> None:
    """Generate DCI patches from semantic masks (+ reference images) with a trained DSDM."""
    from .diffusion.pipeline import SampleConfig, sample_to_folder

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--num-samples", num_samples, 1)
    cfg = _build(
        SampleConfig, load_section(preset, "sample"), "sample", None,
        sampler=sampler, steps=steps, guidance=guidance, num_samples=num_samples, seed=seed,
        batch_size=batch_size, checkpoint=checkpoint,
    )
    result = sample_to_folder(model, masks, out, cfg, references=references, split=split, device=device,
                              log=typer.echo)
    typer.echo(f"samples: {result} (images/, masks/, contact_sheet.png, progression.png)")


@app.command()
def probe(
    data: Annotated[Path, typer.Argument(help="Labelled patch dataset (train split: classifiers; val split: scoring).")],
    dsdm: Annotated[Path, typer.Option("--dsdm", help="train-dsdm run folder (the frozen feature source).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for probe.csv, probe_heatmap.png, probe.json.")],
    preset: PresetOpt = DEFAULT_PRESET,
    blocks: Annotated[Optional[str], typer.Option(help="Decoder blocks, comma-separated.", show_default=_from_preset("probe", "blocks", none="all"))] = None,
    timesteps: Annotated[Optional[str], typer.Option(help="0-based timesteps, comma-separated.", show_default=_from_preset("probe", "timesteps", none="every 100th in [100, T]"))] = None,
    steps: Annotated[Optional[int], typer.Option(help="Adam steps per pixel classifier.", show_default=_from_preset("probe", "steps"))] = None,
    train_images: Annotated[Optional[int], typer.Option(help="Labelled train images the classifiers learn from.", show_default=_from_preset("probe", "train_images"))] = None,
    val_images: Annotated[Optional[int], typer.Option(help="Val images they are scored on.", show_default=_from_preset("probe", "val_images"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (subsets, pixels, classifiers, feature noise).", show_default=_from_preset("probe", "seed"))] = None,
    checkpoint: Annotated[str, typer.Option(help="latest | step_N | a checkpoint folder (best = latest for DSDM runs).")] = "latest",
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
) -> None:
    """Probe DSDM features per decoder block x timestep with pixel classifiers (paper Fig. 3); resumable."""
    from .evaluation.probe import ProbeConfig, run_probe

    _at_least("--steps", steps, 1)
    _at_least("--train-images", train_images, 1)
    _at_least("--val-images", val_images, 1)
    cfg = _build(ProbeConfig, load_section(preset, "probe"), "probe", None, blocks=_ints(blocks), timesteps=_ints(timesteps),
                steps=steps, train_images=train_images, val_images=val_images, seed=seed)
    result = run_probe(data, dsdm, out, cfg, checkpoint=checkpoint, device=device, log=typer.echo)
    best = result["best"]
    typer.echo(f"best: block {best['block']}, timestep {best['timestep']}: mIoU {best['miou']:.4f}, "
               f"mean Dice {best['dice']:.4f}")
    typer.echo("top blocks: " + ", ".join(f"{m['block']} ({m['mean_miou']:.4f})" for m in result["top_blocks"]))
    typer.echo("top timesteps: " + ", ".join(f"{m['timestep']} ({m['mean_miou']:.4f})" for m in result["top_timesteps"]))
    typer.echo("suggested config:\n" + result["suggested_yaml"].rstrip())
    typer.echo(f"probe: {out} (probe.csv, probe_heatmap.png, probe.json)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes (rerun to resume).")] = Path("demo_output"),
    seed: Annotated[int, typer.Option(help="Seed of the generated sample.")] = 0,
) -> None:
    """Run the whole system on the embedded, generated sample at the tiny preset and write a report."""
    from .demo import run_demo

    run_demo(out, seed=seed, log=typer.echo, progress_factory=_progress_factory)


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="Run or experiment folder to summarise.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default: FOLDER/report.html).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Title of the report.")] = None,
) -> None:
    """Write one self-contained HTML report (tables, curves, embedded figures) of a run or experiment folder."""
    from .evaluation.report import render_report

    typer.echo(str(render_report(folder, out=out, title=title)))


@app.command()
def segment(
    inputs: Annotated[list[Path], typer.Argument(help="Slide images (TIFF, PNG, JPEG) or folders of them.")],
    model: Annotated[Path, typer.Option("--model", help="Segmentation run folder (from train-seg).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: <stem>_labels.png, _overlay.png, .geojson, _areas.json.")],
    window: Annotated[Optional[int], typer.Option(help="Sliding-window side in model pixels (default: the run's patch size).")] = None,
    overlap: Annotated[float, typer.Option(help="Fraction of a window shared with its neighbours, in [0, 1).")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    no_color_norm: Annotated[bool, typer.Option("--no-color-norm", help="Skip the colour normalisation of the run's training data.")] = False,
    label_downsample: Annotated[int, typer.Option(help="Write <stem>_labels.png at 1/K of the slide size.")] = 1,
    checkpoint: Annotated[str, typer.Option(help="best | latest | step_N.")] = "best",
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images with more pixels (decompression bombs).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo slides already segmented in --out with the same model and settings (default: skip them).")] = False,
) -> None:
    """Segment whole slides with a trained segmenter (sliding window, colour-normalised like its training data)."""
    from .data.slides import DEFAULT_MAX_PIXELS
    from .inference.slide import find_images, segment_paths
    from .segmentation.run import load_segmenter

    find_images(inputs)  # fail on a bad input before loading the model
    run = load_segmenter(model, checkpoint=checkpoint, device=device)
    segment_paths(run, inputs, out, log=typer.echo, overwrite=overwrite, window=window, overlap=overlap, batch_size=batch_size,
                  color_norm=not no_color_norm, label_downsample=label_downsample,
                  max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    typer.echo(f"segmentations: {out}")


@app.command()
def rasterize(
    inputs: Annotated[list[Path], typer.Argument(help="Slide images or folders of them (their size sets the mask's).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: <stem>_mask.png (0 background, 1 benign, 2 malignant).")],
    annotations: Annotated[Optional[Path], typer.Option(help="Folder of <stem>.geojson files (default: beside each slide).")] = None,
    class_map: Annotated[Optional[Path], typer.Option(help="YAML/JSON mapping of QuPath class names to labels 0/1/2.")] = None,
    downsample: Annotated[int, typer.Option(help="Write masks at 1/K of the slide size (as segment --label-downsample).")] = 1,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images with more pixels (decompression bombs).")] = None,
) -> None:
    """Turn QuPath GeoJSON annotations into label images (ground truth for evaluate-seg)."""
    from .data.rasterize import rasterize_paths
    from .data.slides import DEFAULT_MAX_PIXELS

    rasterize_paths(inputs, out, annotations=annotations, class_map_file=class_map, downsample=downsample,
                    max_pixels=max_pixels or DEFAULT_MAX_PIXELS, log=typer.echo)
    typer.echo(f"label images: {out}")


@app.command("evaluate-seg")
def evaluate_seg_cmd(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predictions: <stem>_labels.png (as `segment` writes) or <stem>.png.")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of ground truths: <stem>_mask.png or <stem>.png.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write metrics.json, per_image.csv, confusion.png, cases.png here.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of the images (<stem>.png|tif|jpg), shown in cases.png.")] = None,
    cases: Annotated[int, typer.Option("--cases", help="Worst and best images shown in cases.png (0: none).")] = 4,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when a prediction or ground truth has no partner (default: warn and skip it).")] = False,
) -> None:
    """Score predicted label images against ground-truth masks (Dice, IoU, precision, recall, accuracy)."""
    from .evaluation.seg_eval import evaluate_folder

    evaluate_folder(pred, truth, out_dir=out, images_dir=images, n_cases=cases, strict=strict, log=typer.echo)


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="table1 | table2 | fig3 | table5 | fig6 | table6 | label-budget")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder made by prepare (patient/slide splits).")],
    out: Annotated[Path, typer.Option("--out", help="Experiment folder (rerun to resume).")],
    preset: PresetOpt = DEFAULT_PRESET,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds.", show_default=_from_preset("experiment", "seeds"))] = None,
    seg_steps: Annotated[Optional[int], typer.Option(help="Segmenter training steps per run.", show_default=_from_preset("experiment", "seg_steps", none="the seg section's"))] = None,
    dsdm_steps: Annotated[Optional[int], typer.Option(help="DSDM training steps per generator.", show_default=_from_preset("experiment", "dsdm_steps", none="the dsdm section's"))] = None,
    encoder_steps: Annotated[Optional[int], typer.Option(help="Reference-encoder training steps.", show_default=_from_preset("experiment", "encoder_steps", none="the encoder section's"))] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="DDIM steps of generated images.", show_default=_from_preset("experiment", "sample_steps"))] = None,
    ratios: Annotated[Optional[str], typer.Option(help="fig6: synthetic ratios, comma-separated (e.g. 0,0.5,1).", show_default=_from_preset("experiment", "ratios"))] = None,
    budgets: Annotated[Optional[str], typer.Option(help="label-budget: N labelled training slides (source images), comma-separated; 0 = all.", show_default=_from_preset("experiment", "budgets"))] = None,
    label_unit: Annotated[Optional[str], typer.Option(help="label-budget: what N counts, slide | patch.", show_default=_from_preset("experiment", "label_unit"))] = None,
    n_eval: Annotated[Optional[int], typer.Option(help="table1/table2: test masks to condition on.", show_default=_from_preset("experiment", "n_eval"))] = None,
    assets: Annotated[Optional[Path], typer.Option(help="Folder for shared models (encoder, DSDM, synthetic pairs).")] = None,
    dsdm: Annotated[Optional[Path], typer.Option(help="Reuse this DSDM run instead of training one.")] = None,
    encoder: Annotated[Optional[Path], typer.Option(help="Reuse this encoder run instead of training one.")] = None,
    inception: Annotated[Optional[Path], typer.Option(help="TorchScript Inception weights for FID (never downloaded).")] = None,
) -> None:
    """Rebuild one of the paper's tables or figures, from data to plot, over several seeds."""
    from .evaluation.experiments import ExperimentConfig, run_experiment

    def floats(text: Optional[str]) -> Optional[list[float]]:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserInputError(f"expected comma-separated numbers, got {text!r}") from None

    for flag, value in (("--seg-steps", seg_steps), ("--dsdm-steps", dsdm_steps), ("--encoder-steps", encoder_steps),
                        ("--sample-steps", sample_steps), ("--n-eval", n_eval)):
        _at_least(flag, value, 1)
    cfg = _build(
        ExperimentConfig, load_section(preset, "experiment"), "experiment", None, seeds=_ints(seeds), seg_steps=seg_steps,
        dsdm_steps=dsdm_steps, encoder_steps=encoder_steps, sample_steps=sample_steps, ratios=floats(ratios),
        budgets=_ints(budgets), label_unit=label_unit, n_eval=n_eval, inception=str(inception) if inception else None,
    )
    folder = run_experiment(name, data, out, preset, cfg, assets=assets, dsdm=dsdm, encoder=encoder, log=typer.echo)
    typer.echo(f"experiment folder: {folder} (results.csv, summary.csv, plots); "
               f"`diffusiondci report {folder}` makes the HTML report")


def main() -> None:
    try:
        app()
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume (add --resume for train-* commands)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
