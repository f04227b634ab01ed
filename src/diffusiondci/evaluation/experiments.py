"""``diffusiondci experiment NAME``: the paper's tables and figures as resumable one-command runs.

Every experiment writes into its folder: ``experiment.json`` (name, dataset, preset, resolved
settings), ``results.csv`` (one row per run and seed: the raw numbers), ``summary.csv`` (mean and
std over seeds per setting) and a plot. Runs live under ``runs/`` and the shared models (encoder,
DSDM, synthetic pairs) under ``assets/`` (or a shared ``--assets`` folder); finished runs are
reused, unfinished ones resumed, so an interrupted experiment continues where it stopped.

=================  ================================================================================
``table1``         generator ablation none / SM / RI / SM+RI: FD (reference-encoder features), FID
                   (when Inception weights are given), KID, LPIPS-style diversity, mIoU of generated
                   images (segmented by a plain U-Net trained on real data, vs the conditioning masks)
``table2``         colour normalisation (on / off, the dataset re-prepared without it) x guidance (0 / 3)
``fig3``           the probe heat-map (``diffusiondci probe``)
``table5``         feature injection none / skip / CAA (+ the plain U-Net)
``fig6``           CAA with synthetic ratios (default 0, 25, 50, 75, 100 %), error bars over seeds
``table6``         baselines in one harness: plain U-Net, denoising U-Net, ddpm-segmentation pixel
                   classifier, DiffusionDCI (CAA + synthetic pairs)
``label-budget``   N labelled images in {8, 16, 32, all}: plain U-Net vs DiffusionDCI with DSDM trained
                   on labelled only / + unlabelled images, with and without synthetic pairs, and the
                   MONAI reference U-Net on the same draw; also ``paired.csv`` (each method's gain over
                   the plain U-Net of the same seed, hence the same slides) and ``paired_vs_monai.csv``;
                   on request, synthetic pairs whose masks are predicted on the unannotated patches
=================  ================================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.imageio import write_json_atomic
from ..diffusion.generate import check_sampler
from ..errors import UserInputError
from .experiment_plots import bar_plot, line_plot
from .experiment_runs import (
    augmented_masks,
    ensure_dsdm,
    ensure_encoder,
    ensure_samples,
    ensure_seg,
    labelled_view,
    pseudo_layouts,
    score_row,
    write_rows,
)
from .generation_scores import SCORE_KEYS

__all__ = ["EXPERIMENTS", "ExperimentConfig", "paired_gain", "run_experiment", "summarize"]

Log = Callable[[str], None]
#: per-image means first, then the dataset-level (pooled confusion matrix) Dice and IoU
METRICS = ("mean_dice", "mean_iou", "mean_precision", "mean_recall", "accuracy", "dataset_dice", "dataset_iou")
#: table1 / table2 columns; the ``*_real`` ones are what real images score (a perfect generator)
GENERATION_METRICS = tuple(k for k in SCORE_KEYS if k != "n_eval")

#: label-budget methods: DiffusionDCI with a DSDM trained on the labelled images only, or on every
#: training image (unlabelled ones with the null mask), the latter also with synthetic pairs; and the
#: off-the-shelf MONAI U-Net (:mod:`~diffusiondci.train.monai_reference`) on the same labelled draw.
#: ``dci_with_unlabelled_pseudo`` (asked for by name only) takes its synthetic pairs' masks from the
#: ``dci_with_unlabelled`` segmenter's predictions on unannotated patches (:func:`pseudo_layouts`)
#: instead of flipped / rotated copies of the annotated masks
DEFAULT_BUDGET_METHODS = ("dci_labelled_only", "dci_with_unlabelled", "dci_with_unlabelled_synthetic", "monai_unet")
BUDGET_METHODS = (*DEFAULT_BUDGET_METHODS, "dci_with_unlabelled_pseudo")


@dataclass
class ExperimentConfig:
    """Budgets and grids of the experiments (section ``experiment`` of the presets)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    encoder_steps: int | None = None  # None: the preset's
    dsdm_steps: int | None = None
    seg_steps: int | None = None
    sample_steps: int = 10  # sampler steps of the synthetic pairs and of the generator scores
    sample_sampler: str = "ddim"  # their sampler (any of diffusion.generate.SAMPLERS)
    n_eval: int = 48  # test masks conditioned on in table1/table2
    diversity_masks: int = 8
    diversity_samples: int = 3
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    budgets: list[int] = field(default_factory=lambda: [8, 16, 32, 0])  # 0 = all labelled images
    budget_synthetic_ratio: float = 1.0
    #: label-budget methods besides the plain U-Net (always trained: the paired baseline); None = all
    budget_methods: list[str] | None = None
    label_unit: str = "slide"  # label-budget: N counts slides (source images, all their patches) | patches
    monai_steps: int = 2500  # label-budget's MONAI U-Net: optimizer steps (batch 12, best validation checkpoint)
    table6_ratio: float = 0.5
    probe_steps: int | None = None
    probe_blocks: list[int] | None = None  # None: the probe section's (all blocks)
    probe_timesteps: list[int] | None = None  # None: the probe section's (every 100th)
    inception: str | None = None  # TorchScript Inception weights for FID (never downloaded)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserInputError("experiment.seeds must not be empty")
        self.seeds = [int(s) for s in self.seeds]
        self.ratios = [float(r) for r in self.ratios]
        self.budgets = [int(b) for b in self.budgets]
        if any(r < 0 for r in self.ratios) or any(b < 0 for b in self.budgets):
            raise UserInputError("experiment.ratios and experiment.budgets must be >= 0")
        check_sampler(self.sample_sampler)
        if self.budget_methods is not None:
            self.budget_methods = [str(m) for m in self.budget_methods]
            unknown = sorted(set(self.budget_methods) - set(BUDGET_METHODS))
            if unknown:
                raise UserInputError(f"experiment.budget_methods: unknown {', '.join(unknown)}; "
                                     f"use any of {', '.join(BUDGET_METHODS)}")
        if isinstance(self.monai_steps, bool) or not isinstance(self.monai_steps, int) or self.monai_steps < 1:
            raise UserInputError(f"experiment.monai_steps must be a positive integer, got {self.monai_steps!r}")
        if self.label_unit not in ("slide", "patch"):
            raise UserInputError(f"experiment.label_unit must be slide or patch, got {self.label_unit!r}")


@dataclass
class _Ctx:
    name: str
    data: Path
    out: Path
    assets: Path
    preset: str
    cfg: ExperimentConfig
    log: Log
    dsdm: Path | None = None
    encoder: Path | None = None

    def run(self, *parts: Any) -> Path:
        return self.out / "runs" / self.name_of(*parts)

    @staticmethod
    def name_of(*parts: Any) -> str:
        return "_".join(str(p) for p in parts)

    def encoder_run(self) -> Path:
        if self.encoder is None:
            self.encoder = ensure_encoder(self.data, self.assets / "encoder", self.preset, self.cfg.encoder_steps,
                                          log=self.log)
        return self.encoder

    def dsdm_run(self) -> Path:
        if self.dsdm is None:
            self.dsdm = ensure_dsdm(self.data, self.assets / "dsdm", self.preset, self.cfg.dsdm_steps,
                                    self.encoder_run(), log=self.log)
        return self.dsdm

    def synthetic(self, ratio: float) -> Path:
        k = max(1, math.ceil(ratio))
        return ensure_samples(self.dsdm_run(), self.data, self.assets / f"synthetic_x{k}{self.sampler_tag()}",
                              self.preset, self.cfg.sample_steps, split="train", num_samples=k, log=self.log,
                              sampler=self.cfg.sample_sampler)

    def sampler_tag(self) -> str:
        """Suffix of synthetic-set folders: none for DDIM (the folders of earlier runs), else the sampler
        and its steps, so that sets of different samplers never share a folder."""
        cfg = self.cfg
        return "" if cfg.sample_sampler == "ddim" else f"_{cfg.sample_sampler}{cfg.sample_steps}"

    def _shared(self, kind: str, name: str, settings: dict[str, Any]) -> Path:
        """The run folder of ``settings`` under ``assets/<kind>``: ``<name>_<hash of the settings>``,
        or any existing folder with that hash (runs are shared by every experiment, whatever name it
        gives them, that uses the same assets folder)."""
        clean = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in settings.items()}
        digest = hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:10]
        root = self.assets / kind
        found = sorted(root.glob(f"*_{digest}")) if root.is_dir() else []
        return found[0] if found else root / f"{name}_{digest}"

    def _link(self, name: str, run: Path) -> None:
        link = self.out / "runs" / name
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(run.resolve(), target_is_directory=True)

    def seg(self, name: str, data: Path | None = None, **kw: Any) -> dict[str, Any]:
        """Scores of a segmenter run; runs with identical settings are shared by every experiment that
        uses the same assets folder (``assets/seg_runs/<name>_<hash of the settings>``, linked from
        ``runs/<name>``)."""
        data = data or self.data
        settings = {"data": data, "preset": self.preset, "steps": self.cfg.seg_steps, **kw}
        run = self._shared("seg_runs", name, settings)
        scores = ensure_seg(data, run, self.preset, self.cfg.seg_steps, log=self.log, **kw)
        self._link(name, run)
        return scores

    def monai(self, name: str, data: Path, seed: int) -> dict[str, Any]:
        """Scores of the MONAI reference U-Net on all labelled training patches of ``data`` (a label
        budget's view), trained for ``monai_steps`` and scored with the preset's test-time augmentation
        like the segmenters; kept as ``assets/monai_runs/<name>_<hash>/scores.json`` and shared."""
        from ..config import build, load_section
        from ..train.monai_reference import train_reference
        from ..train.seg_config import SegConfig

        tta = build(SegConfig, load_section(self.preset, "seg")).tta
        settings = {"data": data, "preset": self.preset, "steps": self.cfg.monai_steps, "seed": seed, "tta": tta}
        run = self._shared("monai_runs", name, settings)
        done = run / "scores.json"
        if not done.is_file():
            self.log(f"training the MONAI reference U-Net -> {run}")
            record, scores, _ = train_reference(data, None, seed, steps=self.cfg.monai_steps, tta=tta,
                                                preset=self.preset)
            run.mkdir(parents=True, exist_ok=True)
            write_json_atomic(done, {"settings": {k: str(v) for k, v in settings.items()}, "record": record,
                                     "scores": scores})
        self._link(name, run)
        return json.loads(done.read_text())["scores"]

    def dsdm_variant(self, name: str, data: Path, encoder: Path | None, seed: int, **overrides: Any) -> Path:
        """A DSDM trained with the experiment's budget and ``overrides`` of the preset, shared like
        :meth:`seg` (``assets/dsdm_runs``); e.g. table2's colour-normalised runs are table1's SM+RI."""
        settings = {"data": data, "preset": self.preset, "steps": self.cfg.dsdm_steps, "encoder": encoder,
                    "seed": seed, **overrides}
        run = self._shared("dsdm_runs", name, settings)
        ensure_dsdm(data, run, self.preset, self.cfg.dsdm_steps, encoder, seed=seed, log=self.log, **overrides)
        self._link(name, run)
        return run


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], keys: list[str], metrics: tuple[str, ...] = METRICS) -> list[dict[str, Any]]:
    """Mean and population std over seeds of ``metrics`` for each distinct value of ``keys``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(keys, key))
        row["n"] = len(members)
        for m in metrics:
            vals = np.array([float(r[m]) for r in members if r.get(m) is not None], dtype=float)
            row[f"{m}_mean"] = round(float(vals.mean()), 4) if vals.size else None
            row[f"{m}_std"] = round(float(vals.std()), 4) if vals.size else None
        out.append(row)
    return out


def paired_gain(rows: list[dict[str, Any]], key: str, baseline: str, within: tuple[str, ...] = (),
                pair: str = "seed", metrics: tuple[str, ...] = ("mean_dice", "mean_iou", "dataset_dice"),
                ) -> list[dict[str, Any]]:
    """Each ``key`` value against ``baseline``, run by run: for the rows that share ``within`` and
    ``pair`` (e.g. the same label budget and seed, hence the same labelled slides) the difference
    ``metric - baseline's metric``; per ``key`` x ``within`` group its mean and population std over
    the pairs, and ``<metric>_wins``: how many pairs it is above the baseline, as "k/n"."""
    def same(r: dict[str, Any]) -> tuple:
        return tuple(r[k] for k in (*within, pair))

    base = {same(r): r for r in rows if r[key] == baseline}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        if r[key] != baseline and same(r) in base:
            groups.setdefault((r[key], *same(r)[:-1]), []).append((r, base[same(r)]))
    out = []
    for group, pairs in groups.items():
        row: dict[str, Any] = dict(zip((key, *within), group))
        row["n"] = len(pairs)
        for m in metrics:
            d = np.array([float(a[m]) - float(b[m]) for a, b in pairs if a.get(m) is not None and b.get(m) is not None])
            row[f"{m}_gain_mean"] = round(float(d.mean()), 4) if d.size else None
            row[f"{m}_gain_std"] = round(float(d.std()), 4) if d.size else None
            row[f"{m}_wins"] = f"{int((d > 0).sum())}/{d.size}"
        out.append(row)
    return out


def _finish(ctx: _Ctx, rows: list[dict[str, Any]], keys: list[str], metrics: tuple[str, ...] = METRICS) -> list[dict]:
    write_rows(ctx.out / "results.csv", rows)
    summary = summarize(rows, keys, metrics)
    write_rows(ctx.out / "summary.csv", summary)
    for r in summary:
        ctx.log("  " + ", ".join(f"{k}={r[k]}" for k in keys) + "  " + "  ".join(
            f"{m}={r[f'{m}_mean']}±{r[f'{m}_std']}" for m in metrics[:2]))
    return summary


# --------------------------------------------------------------------------------------------
# segmentation experiments
# --------------------------------------------------------------------------------------------

_METHODS = {  # train-seg settings of the segmentation methods
    "plain_unet": {"injection": "none", "init": "scratch"},
    "denoising_unet": {"injection": "none", "init": "dsdm"},
    "skip": {"injection": "skip", "init": "dsdm"},
    "caa": {"injection": "caa", "init": "dsdm"},
}


def _seg_method(ctx: _Ctx, method: str, seed: int, tag: str = "", ratio: float = 0.0) -> dict[str, Any]:
    settings = dict(_METHODS[method])
    needs_dsdm = settings["init"] == "dsdm" or settings["injection"] != "none"
    kw: dict[str, Any] = {"seed": seed, **settings}
    if ratio > 0:
        kw.update(synthetic_ratio=ratio, synthetic=ctx.synthetic(ratio))
    scores = ctx.seg(ctx.name_of(method + tag, f"s{seed}"), dsdm=ctx.dsdm_run() if needs_dsdm else None, **kw)
    return {"method": method, "seed": seed, **score_row(scores)}


def table5(ctx: _Ctx) -> None:
    rows = [_seg_method(ctx, m, s) for m in ("plain_unet", "denoising_unet", "skip", "caa") for s in ctx.cfg.seeds]
    summary = _finish(ctx, rows, ["method"])
    bar_plot(summary, "method", "mean_dice", ctx.out / "table5.png", "Table 5: feature injection (test Dice)")


def fig6(ctx: _Ctx) -> None:
    rows = []
    for ratio in ctx.cfg.ratios:
        for s in ctx.cfg.seeds:
            tag = "" if ratio == 0 else f"_r{ratio:g}"
            rows.append({"ratio": ratio, **_seg_method(ctx, "caa", s, tag, ratio)})
    summary = _finish(ctx, rows, ["ratio"])
    line_plot(summary, "ratio", "mean_dice", ctx.out / "fig6_synthetic_ratio.png",
              "Fig. 6: synthetic ratio (CAA)", xlabel="synthetic pairs / real training images")


def table6(ctx: _Ctx) -> None:
    from ..config import build, load_section
    from ..train.seg_config import SegConfig
    from .probe import ProbeConfig, pixel_classifier_baseline

    rows = []
    seg_defaults = build(SegConfig, load_section(ctx.preset, "seg"))
    for s in ctx.cfg.seeds:
        rows.append(_seg_method(ctx, "plain_unet", s))
        rows.append(_seg_method(ctx, "denoising_unet", s))
        marker = ctx.run("pixel_classifier", f"s{s}") / "test_metrics.json"
        if not marker.is_file():
            pcfg = build(ProbeConfig, load_section(ctx.preset, "probe"), seed=s)
            scores = pixel_classifier_baseline(ctx.data, ctx.dsdm_run(), seg_defaults.blocks, seg_defaults.timesteps,
                                               pcfg, split="test")
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, scores)
        rows.append({"method": "pixel_classifier", "seed": s, **score_row(json.loads(marker.read_text()))})
        r = ctx.cfg.table6_ratio
        rows.append({**_seg_method(ctx, "caa", s, f"_r{r:g}" if r else "", r), "method": "diffusiondci"})
    summary = _finish(ctx, rows, ["method"])
    bar_plot(summary, "method", "mean_dice", ctx.out / "table6.png", "Table 6: segmentation methods (test Dice)")


def fig3(ctx: _Ctx) -> None:
    from ..config import build, load_section
    from .probe import ProbeConfig, run_probe

    pcfg = build(ProbeConfig, load_section(ctx.preset, "probe"), steps=ctx.cfg.probe_steps,
                 blocks=ctx.cfg.probe_blocks, timesteps=ctx.cfg.probe_timesteps)
    result = run_probe(ctx.data, ctx.dsdm_run(), ctx.out / "probe", pcfg, progress=False)
    for name in ("probe_heatmap.png", "probe.csv", "probe.json"):
        src = ctx.out / "probe" / name
        if src.is_file():
            shutil.copy(src, ctx.out / name)
    ctx.log(f"  best: {result.get('best')}")


def label_budget(ctx: _Ctx) -> None:
    """Plain U-Net vs DiffusionDCI for each annotation budget N (issue 7). N counts what
    ``label_unit`` says (default: source slides / images, with all their patches)."""
    from ..data.patch_dataset import PatchDataset
    from ..train.seg_data import labelled_groups

    unit = ctx.cfg.label_unit
    train = PatchDataset(ctx.data, splits=("train",), with_masks=False, cache=False)
    groups = labelled_groups(train, unit)
    n_total = len(set(groups)) if groups is not None else len(train)
    encoder = ctx.encoder_run()  # SimCLR needs no labels: trained once on every training image
    ratio = ctx.cfg.budget_synthetic_ratio
    rows = []
    for n in ctx.cfg.budgets:
        n_eff = None if n == 0 or n >= n_total else n
        label = "all" if n_eff is None else str(n_eff)
        for s in ctx.cfg.seeds:
            common = {"labelled": label, "seed": s}
            if n_eff is None:  # every label: the same runs as table5 / fig6 (shared through the assets)
                view, chosen = ctx.data, []
            else:
                view, chosen = labelled_view(ctx.data, ctx.out / "views" / f"n{label}_s{s}", n_eff, s, unit)
            plain = ctx.seg(ctx.name_of("plain_unet", f"n{label}", f"s{s}"), data=view, dsdm=None, injection="none",
                            init="scratch", seed=s)
            rows.append({**common, "method": "plain_unet", **score_row(plain)})
            wanted = set(ctx.cfg.budget_methods or DEFAULT_BUDGET_METHODS)
            if "monai_unet" in wanted:
                scores = ctx.monai(ctx.name_of("monai_unet", f"n{label}", f"s{s}"), view, s)
                rows.append({**common, "method": "monai_unet", **score_row(scores)})
            variants = [("dci_labelled_only", False)] + ([("dci_with_unlabelled", True)] if n_eff is not None else [])
            if n_eff is not None:  # with every label both DSDMs are the experiment's one DSDM
                variants = [(m, unl) for m, unl in variants
                            if m in wanted or f"{m}_synthetic" in wanted or f"{m}_pseudo" in wanted]
            for method, unl in variants:
                if n_eff is None:  # every label used: the experiment's (shared or given) DSDM
                    dsdm = ctx.dsdm_run()
                else:
                    dsdm = ctx.dsdm_variant(f"dsdm_n{label}_s{s}_{'unl' if unl else 'lab'}", view, encoder, s,
                                            use_unlabelled=unl)
                reported = method in wanted or n_eff is None
                pseudo = unl and n_eff is not None and f"{method}_pseudo" in wanted  # needs it as labeller
                if reported or pseudo:
                    scores = ctx.seg(ctx.name_of(method, f"n{label}", f"s{s}"), data=view, dsdm=dsdm,
                                     injection="caa", init="dsdm", seed=s)
                    if reported:
                        rows.append({**common, "method": method, **score_row(scores)})
                if (unl or n_eff is None) and (n_eff is None or f"{method}_synthetic" in wanted):
                    if n_eff is None:
                        synth = ctx.synthetic(ratio)
                    else:  # conditions: the labelled masks and flipped / rotated copies of them
                        need = round(ratio * len(chosen))
                        masks = augmented_masks(view, chosen, ctx.assets / f"masks_n{label}_s{s}_{unit}_r{ratio:g}",
                                                count=need, seed=s)
                        synth = ensure_samples(dsdm, masks, ctx.assets / f"synth_n{label}_s{s}_{unit}_r{ratio:g}"
                                               f"{ctx.sampler_tag()}", ctx.preset, ctx.cfg.sample_steps, split=None,
                                               num_samples=max(1, math.ceil(need / (4 * len(chosen)))), seed=s,
                                               log=ctx.log, sampler=ctx.cfg.sample_sampler)
                    scores = ctx.seg(ctx.name_of(method + "_synthetic", f"n{label}", f"s{s}"), data=view, dsdm=dsdm,
                                     injection="caa", init="dsdm", seed=s, synthetic=synth, synthetic_ratio=ratio)
                    rows.append({**common, "method": method + "_synthetic", **score_row(scores)})
                if pseudo:
                    rows.append({**common, **_pseudo_pairs(ctx, method, view, dsdm, label, s, len(chosen))})
    summary = _finish(ctx, rows, ["method", "labelled"])
    gains = paired_gain(rows, "method", "plain_unet", within=("labelled",))
    write_rows(ctx.out / "paired.csv", gains)
    vs_monai = paired_gain([r for r in rows if r["method"] != "plain_unet"], "method", "monai_unet",
                           within=("labelled",))
    if vs_monai:
        write_rows(ctx.out / "paired_vs_monai.csv", vs_monai)
    for baseline, table in (("plain_unet", gains), ("monai_unet", vs_monai)):
        for r in table:
            ctx.log(f"  {r['method']} vs {baseline}, N={r['labelled']}: pooled Dice gain "
                    f"{r['dataset_dice_gain_mean']}±{r['dataset_dice_gain_std']} (above it in "
                    f"{r['dataset_dice_wins']} seeds), per-image {r['mean_dice_gain_mean']} ({r['mean_dice_wins']})")
    line_plot(summary, "labelled", "mean_dice", ctx.out / "label_budget.png", "Label budget: test Dice vs N",
              xlabel=f"labelled training {unit}s N", group="method")


def _pseudo_pairs(ctx: _Ctx, method: str, view: Path, dsdm: Path, label: str, seed: int,
                  n_labelled: int) -> dict[str, Any]:
    """``<method>_pseudo`` of a label budget: the (already trained) ``<method>`` run predicts the
    masks of ``budget_synthetic_ratio`` x ``n_labelled`` unannotated training patches, the DSDM
    renders each from its mask with its own patch as reference, and a CAA segmenter trains on the
    annotated patches plus those pairs."""
    labeller = ctx.run(method, f"n{label}", f"s{seed}").resolve()
    ratio = ctx.cfg.budget_synthetic_ratio
    need = max(1, round(ratio * n_labelled))
    tag = f"n{label}_s{seed}_{ctx.cfg.label_unit}_r{ratio:g}"
    layouts = pseudo_layouts(labeller, view, ctx.assets / f"pseudo_{tag}", need, seed)
    synth = ensure_samples(dsdm, layouts, ctx.assets / f"synth_pseudo_{tag}{ctx.sampler_tag()}", ctx.preset,
                           ctx.cfg.sample_steps, split="train", seed=seed, log=ctx.log,
                           sampler=ctx.cfg.sample_sampler)
    scores = ctx.seg(ctx.name_of(method + "_pseudo", f"n{label}", f"s{seed}"), data=view, dsdm=dsdm,
                     injection="caa", init="dsdm", seed=seed, synthetic=synth, synthetic_ratio=ratio)
    return {"method": method + "_pseudo", **score_row(scores)}


# --------------------------------------------------------------------------------------------
# generation experiments
# --------------------------------------------------------------------------------------------

_VARIANTS = {"none": ("group", False), "SM": ("spade", False), "RI": ("group", True), "SM+RI": ("spade", True)}


def _generation_scores(ctx: _Ctx, dsdm: Path, data: Path, tag: str, guidance: float | None, seed: int,
                       real_seg: Path) -> dict[str, Any]:
    from .generation_scores import score_generator

    return score_generator(dsdm, data, ctx.out / "samples" / tag, ctx.preset, ctx.cfg, guidance, seed, real_seg,
                           ctx.encoder_run(), log=ctx.log)


def _real_segmenter(ctx: _Ctx, data: Path, tag: str = "") -> Path:
    """A plain U-Net trained on the real images (scores generated images in table1/table2)."""
    name = f"real_seg{tag}"
    ctx.seg(name, data=data, dsdm=None, injection="none", init="scratch", seed=0)  # = table5's plain_unet_s0
    return (ctx.out / "runs" / name).resolve()


def table1(ctx: _Ctx) -> None:
    real_seg = _real_segmenter(ctx, ctx.data)
    rows = []
    for variant, (norm, use_ref) in _VARIANTS.items():
        for s in ctx.cfg.seeds:
            name = f"dsdm_{variant.replace('+', '_')}_s{s}"
            dsdm = ctx.dsdm_variant(name, ctx.data, ctx.encoder_run(), s, decoder_norm=norm,
                                    use_reference=use_ref)
            scores = _generation_scores(ctx, dsdm, ctx.data, name, None, s, real_seg)
            rows.append({"variant": variant, "seed": s, **scores})
    metrics = GENERATION_METRICS
    summary = _finish(ctx, rows, ["variant"], metrics)
    bar_plot(summary, "variant", "fd_encoder", ctx.out / "table1.png", "Table 1: generator ablation (FD, lower is better)")


def _unnormalised_copy(ctx: _Ctx) -> Path:
    """The dataset prepared again from its recorded sources with colour normalisation off."""
    from ..config import build
    from ..data.prepare import PrepareConfig, prepare_dataset

    meta = json.loads((ctx.data / "dataset.json").read_text())
    src = meta.get("source") or {}
    if not src.get("input"):
        raise UserInputError("table2 needs a dataset made by `prepare` (it re-prepares it without colour "
                             "normalisation from the recorded sources)", ctx.data)
    out = ctx.assets / "data_no_color_norm"
    params = {k: v for k, v in (meta.get("parameters") or {}).items()}
    params["color_norm"] = False
    class_map_file = None
    if src.get("class_map"):
        class_map_file = ctx.assets / "class_map.json"
        write_json_atomic(class_map_file, src["class_map"])
    input_unlabelled = any(not sl.get("labelled", True) for sl in src.get("slides") or [])
    prepare_dataset(src["input"], out, build(PrepareConfig, params), masks_dir=src.get("masks"),
                    groups_csv=src.get("groups_csv"), class_map_file=class_map_file,
                    unlabelled_dir=src.get("unlabelled"), allow_unlabelled=input_unlabelled, log=lambda m: None)
    return out


def table2(ctx: _Ctx) -> None:
    datasets = {"on": ctx.data, "off": _unnormalised_copy(ctx)}
    rows = []
    for norm, data in datasets.items():
        real_seg = _real_segmenter(ctx, data, "" if norm == "on" else "_no_norm")
        # the normalised arm reuses the experiment's encoder (and so table1's SM+RI DSDMs); the other
        # gets its own, trained the same way on the unnormalised images
        enc = ctx.encoder_run() if norm == "on" else ensure_encoder(
            data, ctx.assets / "encoder_norm_off", ctx.preset, ctx.cfg.encoder_steps, log=ctx.log)
        for s in ctx.cfg.seeds:
            dsdm = ctx.dsdm_variant(f"dsdm_norm_{norm}_s{s}", data, enc, s, decoder_norm="spade", use_reference=True)
            for guidance in (0.0, 3.0):
                tag = f"norm_{norm}_g{guidance:g}_s{s}"
                scores = _generation_scores(ctx, dsdm, data, tag, guidance, s, real_seg)
                rows.append({"color_norm": norm, "guidance": guidance, "seed": s, **scores})
    metrics = GENERATION_METRICS
    summary = _finish(ctx, rows, ["color_norm", "guidance"], metrics)
    for r in summary:
        r["setting"] = f"norm {r['color_norm']}, s={r['guidance']:g}"
    bar_plot(summary, "setting", "fd_encoder", ctx.out / "table2.png", "Table 2: colour normalisation x guidance (FD)")


EXPERIMENTS: dict[str, Callable[[_Ctx], None]] = {
    "table1": table1,
    "table2": table2,
    "fig3": fig3,
    "table5": table5,
    "fig6": fig6,
    "table6": table6,
    "label-budget": label_budget,
}


def run_experiment(
    name: str,
    data: str | Path,
    out: str | Path,
    preset: str = "tiny",
    cfg: ExperimentConfig | None = None,
    assets: str | Path | None = None,
    dsdm: str | Path | None = None,
    encoder: str | Path | None = None,
    log: Log = print,
) -> Path:
    """Run experiment ``name`` on dataset ``data`` into folder ``out`` (see the module docstring)."""
    if name not in EXPERIMENTS:
        raise UserInputError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    cfg = cfg or ExperimentConfig()
    data, out = Path(data), Path(out)
    if not (data / "dataset.json").is_file():
        raise UserInputError("not a dataset folder (no dataset.json); make one with `diffusiondci prepare`", data)
    record = {
        "name": name,
        "data": str(data.resolve()),
        "preset": preset,
        "settings": dataclasses.asdict(cfg),
        "dsdm": str(Path(dsdm).resolve()) if dsdm else None,
        "encoder": str(Path(encoder).resolve()) if encoder else None,
    }
    path = out / "experiment.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        same = {k: v for k, v in saved.items() if k != "settings"} == {k: v for k, v in record.items() if k != "settings"}
        grids = ("seeds", "ratios", "budgets", "budget_methods")  # may grow or shrink: finished runs are reused
        # a setting newer than the saved record takes its current value
        saved_s = {k: v for k, v in {**record["settings"], **saved["settings"]}.items() if k not in grids}
        if not same or saved_s != {k: v for k, v in record["settings"].items() if k not in grids}:
            raise UserInputError("folder holds this experiment with other settings; use a new --out "
                                 "(only --seeds, --ratios, --budgets and --budget-methods may change when continuing)", path)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record, sort_keys=True)
    ctx = _Ctx(name, data, out, Path(assets) if assets else out / "assets", preset, cfg, log,
               Path(dsdm) if dsdm else None, Path(encoder) if encoder else None)
    log(f"experiment {name}: {out}")
    EXPERIMENTS[name](ctx)
    return out
