"""The commands that use what the others made: ``sample`` and ``probe`` (a trained DSDM), ``segment``
(a trained segmenter), ``rasterize`` and ``evaluate-seg`` (ground truth and scores), ``report``,
``experiment`` (the paper's tables and figures) and ``demo`` (the whole chain)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import load_section
from ..errors import UserInputError
from .common import DEFAULT_PRESET, PresetOpt, _at_least, _build, _from_preset, _ints, _progress_factory, app


@app.command()
def sample(
    model: Annotated[Path, typer.Option("--model", help="DSDM run folder (from train-dsdm).")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of label masks (.png, .tif, .tiff), or a dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (dataset layout: images/, masks/, manifest.csv).")],
    references: Annotated[Optional[Path], typer.Option("--references", help="Folder of reference images (matched by id, else taken in turn).")] = None,
    split: Annotated[Optional[str], typer.Option(help="With a dataset as --masks: use this split only.")] = None,
    preset: PresetOpt = DEFAULT_PRESET,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm | ddim | dpmpp (DPM-Solver++(2M)) | dpmpp_sde (its stochastic form); dpmpp_karras / dpmpp_sde_karras: the same on Karras sigmas.", show_default=_from_preset("sample", "sampler"))] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (auto: all T for ddpm, 50 for the others).", show_default=_from_preset("sample", "steps"))] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale s of eq. 17 (the paper: 3).", show_default=_from_preset("sample", "guidance"))] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Images per mask.", show_default=_from_preset("sample", "num_samples"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (same seed, same images).", show_default=_from_preset("sample", "seed"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per sampling batch.", show_default=_from_preset("sample", "batch_size"))] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="latest | step_N | a checkpoint folder (best = latest for DSDM runs).", show_default=_from_preset("sample", "checkpoint"))] = None,
    autocast: Annotated[Optional[str], typer.Option(help="Network precision: auto (bf16 where the CPU/GPU has it natively) | bf16 | fp32.", show_default=_from_preset("sample", "autocast", none="fp32"))] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: cuda if available).")] = None,
) -> None:
    """Generate DCI patches from semantic masks (+ reference images) with a trained DSDM."""
    from ..diffusion.pipeline import SampleConfig, sample_to_folder

    _at_least("--steps", steps, 1)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--num-samples", num_samples, 1)
    cfg = _build(
        SampleConfig, load_section(preset, "sample"), "sample", None,
        sampler=sampler, steps=steps, guidance=guidance, num_samples=num_samples, seed=seed,
        batch_size=batch_size, checkpoint=checkpoint, autocast=autocast,
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
    from ..evaluation.probe import ProbeConfig, run_probe

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
    from ..demo import run_demo

    run_demo(out, seed=seed, log=typer.echo, progress_factory=_progress_factory)


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="Run or experiment folder to summarise.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default: FOLDER/report.html).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Title of the report.")] = None,
) -> None:
    """Write one self-contained HTML report (tables, curves, embedded figures) of a run or experiment folder."""
    from ..evaluation.report import render_report

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
    tta: Annotated[Optional[str], typer.Option(help="Test-time augmentation: none | flip (2 views) | dihedral (8 flips / quarter turns, 8x the time). Default: the run's own (train-seg --tta).")] = None,
) -> None:
    """Segment whole slides with a trained segmenter (sliding window, colour-normalised like its training data)."""
    from ..data.slides import DEFAULT_MAX_PIXELS
    from ..inference.slide import find_images, segment_paths
    from ..segmentation.run import load_segmenter

    find_images(inputs)  # fail on a bad input before loading the model
    run = load_segmenter(model, checkpoint=checkpoint, device=device, tta=tta)
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
    from ..data.rasterize import rasterize_paths
    from ..data.slides import DEFAULT_MAX_PIXELS

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
    from ..evaluation.seg_eval import evaluate_folder

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
    sample_steps: Annotated[Optional[int], typer.Option(help="Sampler steps of generated images.", show_default=_from_preset("experiment", "sample_steps"))] = None,
    sample_sampler: Annotated[Optional[str], typer.Option(help="Sampler of generated images: ddim | ddpm | dpmpp | dpmpp_sde | dpmpp_karras | dpmpp_sde_karras.", show_default=_from_preset("experiment", "sample_sampler"))] = None,
    ratios: Annotated[Optional[str], typer.Option(help="fig6: synthetic ratios, comma-separated (e.g. 0,0.5,1).", show_default=_from_preset("experiment", "ratios"))] = None,
    budgets: Annotated[Optional[str], typer.Option(help="label-budget: N labelled training slides (source images), comma-separated; 0 = all.", show_default=_from_preset("experiment", "budgets"))] = None,
    label_unit: Annotated[Optional[str], typer.Option(help="label-budget: what N counts, slide | patch.", show_default=_from_preset("experiment", "label_unit"))] = None,
    budget_methods: Annotated[Optional[str], typer.Option(help="label-budget: methods besides the plain U-Net, comma-separated (dci_labelled_only, dci_with_unlabelled, dci_with_unlabelled_synthetic, monai_unet; dci_with_unlabelled_pseudo: pairs rendered from masks predicted on the unannotated patches, only when named).", show_default=_from_preset("experiment", "budget_methods", none="all"))] = None,
    monai_steps: Annotated[Optional[int], typer.Option(help="label-budget: training steps of the MONAI reference U-Net.", show_default=_from_preset("experiment", "monai_steps"))] = None,
    n_eval: Annotated[Optional[int], typer.Option(help="table1/table2: test masks to condition on.", show_default=_from_preset("experiment", "n_eval"))] = None,
    assets: Annotated[Optional[Path], typer.Option(help="Folder for shared models (encoder, DSDM, synthetic pairs).")] = None,
    dsdm: Annotated[Optional[Path], typer.Option(help="Reuse this DSDM run instead of training one.")] = None,
    encoder: Annotated[Optional[Path], typer.Option(help="Reuse this encoder run instead of training one.")] = None,
    inception: Annotated[Optional[Path], typer.Option(help="TorchScript Inception weights for FID (never downloaded).")] = None,
) -> None:
    """Rebuild one of the paper's tables or figures, from data to plot, over several seeds."""
    from ..evaluation.experiments import ExperimentConfig, run_experiment

    def floats(text: Optional[str]) -> Optional[list[float]]:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserInputError(f"expected comma-separated numbers, got {text!r}") from None

    for flag, value in (("--seg-steps", seg_steps), ("--dsdm-steps", dsdm_steps), ("--encoder-steps", encoder_steps),
                        ("--sample-steps", sample_steps), ("--n-eval", n_eval), ("--monai-steps", monai_steps)):
        _at_least(flag, value, 1)
    cfg = _build(
        ExperimentConfig, load_section(preset, "experiment"), "experiment", None, seeds=_ints(seeds), seg_steps=seg_steps,
        dsdm_steps=dsdm_steps, encoder_steps=encoder_steps, sample_steps=sample_steps, sample_sampler=sample_sampler,
        ratios=floats(ratios),
        budgets=_ints(budgets), label_unit=label_unit, n_eval=n_eval, monai_steps=monai_steps,
        budget_methods=[m.strip() for m in budget_methods.split(",") if m.strip()] if budget_methods else None, inception=str(inception) if inception else None,
    )
    folder = run_experiment(name, data, out, preset, cfg, assets=assets, dsdm=dsdm, encoder=encoder, log=typer.echo)
    typer.echo(f"experiment folder: {folder} (results.csv, summary.csv, plots); "
               f"`diffusiondci report {folder}` makes the HTML report")
