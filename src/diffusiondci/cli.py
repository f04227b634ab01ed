"""The ``diffusiondci`` command line: one subcommand per stage of the paper.

Each command is a thin call into its stage; errors a user can fix are printed as one line
(``error: <file>: <what to do>``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from . import __version__
from .config import build, load_section
from .errors import UserInputError

app = typer.Typer(
    help="DiffusionDCI: diffusion-based generation and segmentation of Dynamic Cell Imaging slides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

PresetOpt = Annotated[str, typer.Option("--preset", help="Config preset: tiny | paper | path to a YAML file.")]


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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffusiondci {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Run `diffusiondci COMMAND --help` for the options of each step."""


@app.command()
def prepare(
    input_dir: Annotated[Path, typer.Argument(help="Folder of whole-slide images (TIFF, PNG, JPEG).")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    preset: PresetOpt = "paper",
    masks: Annotated[Optional[Path], typer.Option(help="Folder with <stem>_mask.png|tif or <stem>.geojson.")] = None,
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
                    log=typer.echo, progress_factory=_progress_factory)


@app.command("import-patches")
def import_patches_cmd(
    source: Annotated[Path, typer.Argument(help="Folder with images/ and masks/ of already-cut patches.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder.")],
    groups: Annotated[Optional[Path], typer.Option(help="CSV: patch id, group id (e.g. patient).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of groups for validation.")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Fraction of groups for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Validate already-cut patches and import them into the dataset layout (no resampling)."""
    from .data.import_patches import import_patches

    import_patches(source, out, groups_csv=groups, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed, log=typer.echo)


@app.command("train-encoder")
def train_encoder_cmd(
    data: Annotated[Path, typer.Argument(help="Patch dataset folder (from prepare or import-patches).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    preset: PresetOpt = "paper",
    steps: Annotated[Optional[int], typer.Option(help="Training iterations (overrides the preset).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Train the ResNet-18 reference encoder with SimCLR and cache patch embeddings."""
    from .train.encoder import EncoderConfig, train_encoder

    cfg = build(EncoderConfig, load_section(preset, "encoder"), steps=steps, batch_size=batch_size, seed=seed)
    run = train_encoder(data, out, cfg, resume=resume)
    typer.echo(f"encoder run: {run} (encoder/, embeddings.safetensors, log.csv)")


@app.command("train-dsdm")
def train_dsdm_cmd(
    data: Annotated[Path, typer.Argument(help="Patch dataset folder (from prepare or import-patches).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="train-encoder run folder (reference embeddings); not needed with --no-reference.")] = None,
    preset: PresetOpt = "paper",
    steps: Annotated[Optional[int], typer.Option(help="Training iterations (overrides the preset; paper 50000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process (paper 10).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (paper 1e-4).")] = None,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Ablation: GroupNorm decoder, no semantic mask.")] = False,
    no_reference: Annotated[bool, typer.Option("--no-reference", help="Ablation: no reference image (no MCAA, no encoder).")] = False,
    guidance_drop: Annotated[Optional[float], typer.Option("--guidance-drop", help="Classifier-free guidance: probability of each dropout case (mask only, reference only, both).")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Write DDIM samples every N steps (0 = off).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
) -> None:
    """Train the DSDM generator (semantic mask + reference image guidance, hybrid loss)."""
    from .train.dsdm import DSDMConfig, train_dsdm

    cfg = build(
        DSDMConfig, load_section(preset, "dsdm"),
        steps=steps, batch_size=batch_size, lr=lr, sample_every=sample_every, seed=seed,
        decoder_norm="group" if no_mask else None, use_reference=False if no_reference else None,
        p_drop_mask=guidance_drop, p_drop_ref=guidance_drop, p_drop_both=guidance_drop,
    )
    run = train_dsdm(data, out, cfg, encoder_run=encoder, resume=resume, device=device)
    typer.echo(f"DSDM run: {run} (dsdm.json, checkpoints/, log.csv)")


@app.command()
def sample(
    model: Annotated[Path, typer.Option("--model", help="DSDM run folder (from train-dsdm).")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of label masks (PNG), or a dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (dataset layout: images/, masks/, manifest.csv).")],
    references: Annotated[Optional[Path], typer.Option("--references", help="Folder of reference images (matched by id, else taken in turn).")] = None,
    split: Annotated[Optional[str], typer.Option(help="With a dataset as --masks: use this split only.")] = None,
    preset: PresetOpt = "paper",
    sampler: Annotated[Optional[str], typer.Option(help="ddpm | ddim.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: all T for ddpm, 50 for ddim).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale s of eq. 17 (paper 3).")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Images per mask.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same images).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per sampling batch.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="latest | best | step_N | a checkpoint folder.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
) -> None:
    """Generate DCI patches from semantic masks (+ reference images) with a trained DSDM."""
    from .diffusion.pipeline import SampleConfig, sample_to_folder

    cfg = build(
        SampleConfig, load_section(preset, "sample"),
        sampler=sampler, steps=steps, guidance=guidance, num_samples=num_samples, seed=seed,
        batch_size=batch_size, checkpoint=checkpoint,
    )
    result = sample_to_folder(model, masks, out, cfg, references=references, split=split, device=device,
                              log=typer.echo)
    typer.echo(f"samples: {result} (images/, masks/, contact_sheet.png, progression.png)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = Path("demo_output"),
    seed: Annotated[int, typer.Option(help="Seed of the generated sample.")] = 0,
) -> None:
    """Run the pipeline on the embedded, generated sample at the tiny preset."""
    from .data.phantom import write_sample
    from .data.prepare import PrepareConfig, prepare_dataset
    from .data.preview import dataset_overview

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sample_dir = out / "sample"
    if not (sample_dir / "slides").is_dir():
        write_sample(sample_dir, seed=seed)
        typer.echo(f"generated the embedded sample in {sample_dir}")
    cfg = build(PrepareConfig, load_section("tiny", "prepare"))
    dataset = prepare_dataset(sample_dir / "slides", out / "dataset", cfg,
                              groups_csv=sample_dir / "slides" / "groups.csv",
                              log=typer.echo, progress_factory=_progress_factory)
    overview = dataset_overview(dataset, out / "overview.png")
    typer.echo("")
    typer.echo(f"demo finished in {time.perf_counter() - start:.1f} s")
    typer.echo(f"  patch dataset:     {dataset} (images/, masks/, manifest.csv, dataset.json)")
    typer.echo(f"  colour-norm views: {dataset / 'thumbnails'}")
    typer.echo(f"  overview picture:  {overview}")


def main() -> None:
    try:
        app()
    except UserInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
