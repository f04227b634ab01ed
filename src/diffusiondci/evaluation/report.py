"""``diffusiondci report``: the page assembly of one self-contained HTML summary of a folder.

The page is meant to be opened by a clinician-researcher on any machine, offline: every picture is
embedded as a ``data:image/png;base64`` URI (large PNGs are downscaled to at most
:data:`MAX_SIDE` px with PIL first), the style sheet is inline, there is no JavaScript and no link to
anything outside the file. All text taken from the folder is HTML-escaped.

:func:`render_report` walks the folder recursively (``checkpoints/``, ``tb/``, hidden folders and
the ``images/`` / ``masks/`` folders of datasets are skipped) and builds the sections it finds
material for, in this order:

1. overview: title, date and folder;
2. summary, the answer first: which model segments best, by how much over the plain U-Net, with
   what spread over seeds (comparison table), each test slide's prediction next to its truth,
   the contact sheets of generated samples and the training curves of the compared runs;
3. experiment results: ``experiment.json``, ``summary.csv`` (``X_mean`` / ``X_std`` columns shown as
   ``mean ± std``), ``paired.csv`` (gains over a baseline, same seed), ``results.csv`` (all folded)
   and the PNG plots beside them;
4. metrics tables: every ``metrics.json`` (nested dicts flattened, per-class values as a class
   table, numbers to 4 significant digits) and ``per_image.csv`` (folded);
5. training curves drawn from every ``log.csv`` with matplotlib (Agg canvas, no pyplot state);
6. generated samples: ``contact_sheet.png``, ``progression.png``, latest ``samples/step_*/samples.png``;
7. probe: ``probe_heatmap.png``, ``probe.csv`` (block x timestep grid of mIoU), ``probe.json``;
8. segmentation: ``confusion.png``, ``cases.png``, slide ``*_overlay.png`` with ``*_areas.json``;
9. other figures: any PNG not shown yet (capped);
10. runs and settings: one row per run (a folder with ``config.json``), folded.

Raw keys of the files (column names, JSON keys, settings) are shown only inside folded
``<details>`` blocks; the summary and the visible text use plain-language labels. Pictures the
summary shows are not repeated below. Unreadable or corrupt files never stop the report: each
becomes a line under "Warnings".

This module only assembles the page; the pieces live beside it: ``report_files`` (folder scan and
safe reading), ``report_html`` (escaping, tables, figures), ``report_summary`` (2, with
``report_comparison`` and ``report_slides``), ``report_experiments`` (3), ``report_metrics`` (4),
``report_curves`` (5), ``report_figures`` (6-9) and ``report_runs`` (1, 10).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..errors import UserInputError
from .report_curves import curves_section
from .report_experiments import experiments_section
from .report_figures import other_section, probe_section, samples_section, segmentation_section
from .report_files import MAX_SIDE, MAX_WALK_FILES, scan_folder
from .report_html import CSS, MAX_IMAGES_PER_SECTION, Builder, esc
from .report_metrics import metrics_section
from .report_runs import overview_section, runs_section
from .report_summary import summary_section

DEFAULT_NAME = "report.html"

_EXPLAIN = {
    "experiments": "An experiment trains and evaluates the same pipeline under several settings, each "
                   "repeated with different random seeds; the summary gives the average and spread over seeds.",
    "metrics": "Scores written at the end of each run or evaluation. Dice and IoU measure the overlap between "
               "the predicted and the annotated regions (1 = perfect, 0 = none); precision is the share of "
               "predicted pixels that are correct, recall the share of annotated pixels that were found.",
    "curves": "How the training error (loss) evolved with the number of optimisation steps; a curve that "
              "levels off means training has converged. Validation curves are measured on held-out patches.",
    "samples": "Synthetic images made by the diffusion generator. In a contact sheet each row shows the "
               "class mask it was asked to follow, the reference image whose appearance it imitates, then "
               "the generated images.",
    "probe": "Which internal features of the diffusion model are most useful for segmentation: each decoder "
             "block and noise level was tested with a small classifier.",
    "segmentation": "Results of the tissue segmentation (background, benign, malignant): the confusion matrix, "
                    "example cases and slide-level maps with the area of each class.",
    "other": "Further pictures found in the folder.",
    "runs": "Each run is one training or evaluation (a folder with a config.json): its stage, how many "
            "optimisation steps were done, and its settings as the program recorded them.",
}


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The HTML page: the first section without a heading, the contents after the summary (or the first)."""
    lead = 2 if len(sections) > 1 and sections[1][0] == "summary" else 1
    nav = "".join(f'<li><a href="#{sid}">{esc(h)}</a></li>' for sid, h, _ in sections[lead:])
    body = []
    for i, (sid, heading, content) in enumerate(sections):
        head = f"<h2>{esc(heading)}</h2>" if i else ""
        body.append(f'<section id="{sid}">{head}{content}</section>')
        if i == lead - 1 and nav:
            body.append(f"<nav><b>Details</b><ul>{nav}</ul></nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def render_report(root: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Write the HTML report of ``root`` (a run or experiment folder) to ``out``; returns ``out``.

    ``out`` defaults to ``root/report.html`` and ``title`` to "DiffusionDCI report: <folder name>".
    Raises :class:`UserInputError` when ``root`` is not an existing folder.
    """
    root = Path(root)
    if not root.exists():
        raise UserInputError("folder not found; give a run or experiment folder", root)
    if not root.is_dir():
        raise UserInputError("is a file, not a folder; give a run or experiment folder", root)
    root = root.resolve()
    out = Path(out) if out is not None else root / DEFAULT_NAME
    title = title or f"DiffusionDCI report: {root.name}"

    found = scan_folder(root)
    b = Builder(root)
    overview = overview_section(b, found, title)
    summary = summary_section(b, found)  # first, so that the sections below skip what it shows
    for sid, heading, fn in (
        ("experiments", "Experiment results", experiments_section),
        ("metrics", "Metrics", metrics_section),
        ("curves", "Training curves", curves_section),
        ("samples", "Generated samples", samples_section),
        ("probe", "Feature probe", probe_section),
        ("segmentation", "Segmentation", segmentation_section),
        ("other", "Other figures", other_section),
        ("runs", "Runs and settings", runs_section),
    ):
        b.add(sid, heading, _EXPLAIN[sid], fn(b, found))
    if found.truncated:
        b.warnings.append(f"the folder holds more than {MAX_WALK_FILES} files; the rest were not looked at")
    if not b.sections and not summary:
        overview += ('<p class="note">Nothing recognisable was found in this folder: no run folders '
                     "(config.json), experiment results (experiment.json, summary.csv), metrics.json, "
                     "log.csv or PNG figures.</p>")
    elif b.warnings:
        overview += f'<p class="note">{len(b.warnings)} file(s) could not be read; see Warnings at the end.</p>'
    if b.sections and not summary:
        overview += ('<p class="note">No comparison of models, test-slide results, generated samples or '
                     "training curves were found to summarise; what the folder holds follows.</p>")
    head = [("overview", "Overview", overview)] + ([("summary", "Summary", summary)] if summary else [])
    sections = [*head, *b.sections]
    if b.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in b.warnings)
        explain = '<p class="explain">These files were found but could not be used.</p>'
        sections.append(("warnings", "Warnings", f'{explain}<ul class="warn">{items}</ul>'))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(_page(title, sections), encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["MAX_IMAGES_PER_SECTION", "MAX_SIDE", "render_report"]
