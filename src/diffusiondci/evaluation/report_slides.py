"""The report's test slides: the predicted map next to the truth, slide by slide, with each slide's scores.

Driven by the ``metrics.json`` of ``evaluate-seg`` (its ``per_image`` rows name each slide's
prediction and truth files, ``prediction_dir`` / ``truth_dir`` the folders). For each slide the
prediction is ``segment``'s ``<stem>_overlay.png`` (the slide with the predicted classes tinted);
the truth is drawn the same way over the slide (read from the ``input`` recorded in
``<stem>_areas.json``, as a bounded-memory thumbnail) or, when the slide is not found, shown as a
label mask in the class colours. The model is named from the ``model_run`` recorded there. Files
are looked up inside the report's folder first.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report_comparison import seg_method_label
from .report_files import MAX_IMAGE_PIXELS, MAX_SIDE, Found, Unreadable, number, read_json
from .report_html import Builder, esc, table

#: Slides shown side by side in the summary; the rest are named in a note.
MAX_SLIDES = 8
#: Opacity of the class colour in the truth overlay (as ``segment`` draws the predicted one).
OVERLAY_ALPHA = 0.45


@dataclass
class SlideResult:
    stem: str
    dice: float | None
    miou: float | None
    per_class: dict[str, float | None]
    prediction: Path | None  # the overlay (or the label image) inside the folder
    truth: Path | None
    slide: Path | None  # the slide image recorded by segment
    model: Path | None  # the segmentation run segment used


def _inside(b: Builder, found: Found, folder: Any, name: str) -> Path | None:
    """``folder/name`` when it lies in the report's folder, else the first PNG of that name there."""
    if folder:
        p = Path(str(folder)) / name
        try:
            p.resolve().relative_to(b.root)
            if p.is_file():
                return p
        except (ValueError, OSError):
            pass
    return next((p for p in found.pngs if p.name == name), None)


def slide_results(b: Builder, found: Found) -> list[tuple[Path, list[SlideResult]]]:
    """``[(metrics.json, [one result per slide])]`` of every ``evaluate-seg`` output in the folder."""
    out = []
    for path in found.metrics:
        try:
            data = read_json(path)
        except Unreadable:
            continue  # reported in the metrics section
        rows = data.get("per_image") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows:
            continue
        results = []
        for r in rows:
            if not isinstance(r, dict) or "stem" not in r:
                continue
            stem = str(r["stem"])
            pred_dir = data.get("prediction_dir")
            overlay = _inside(b, found, pred_dir, f"{stem}_overlay.png")
            prediction = overlay or _inside(b, found, pred_dir, str(r.get("prediction", "")))
            truth = _inside(b, found, data.get("truth_dir"), str(r.get("truth", "")))
            record = _segment_record(pred_dir, stem)
            slide, model = (Path(str(record[k])) if record.get(k) else None for k in ("input", "model_run"))
            results.append(SlideResult(
                stem, number(r.get("mean_dice")), number(r.get("mean_iou")),
                {c: number(r.get(f"dice_{c}")) for c in ("benign", "malignant")}, prediction, truth,
                slide if overlay is not None and slide is not None and slide.is_file() else None, model))
        if results:
            out.append((path, results))
    return out


def _segment_record(pred_dir: Any, stem: str) -> dict[str, Any]:
    """What ``segment`` recorded in ``<stem>_areas.json`` (the slide read, the model run), or {}."""
    if not pred_dir:
        return {}
    try:
        info = read_json(Path(str(pred_dir)) / f"{stem}_areas.json")
    except (Unreadable, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def _model_name(b: Builder, run: Path | None) -> str:
    """``DiffusionDCI (CAA + synthetic pairs) (runs/segmenter)``: the method of a segmentation run."""
    if run is None:
        return ""
    try:
        config = read_json(run / "config.json")
        label = seg_method_label(config) if isinstance(config, dict) and config.get("stage") == "seg" else ""
    except (Unreadable, OSError):
        label = ""
    where = b.rel(run) if run.is_absolute() else str(run)
    return f"{label} (<code>{esc(where)}</code>)" if label else f"<code>{esc(where)}</code>"


def truth_overlay(slide: Path, truth: Path, size: tuple[int, int]) -> str:
    """PNG data URI of ``slide`` (thumbnail of ``size`` = width, height) with the truth classes tinted."""
    import numpy as np
    from PIL import Image

    from ..data.preview import colour_mask
    from ..data.slides import open_slide

    if max(size) > MAX_SIDE:  # as large as the other embedded pictures at most
        f = MAX_SIDE / max(size)
        size = (max(1, round(size[0] * f)), max(1, round(size[1] * f)))
    with Image.open(truth) as im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise Unreadable(f"{im.width} x {im.height} px is too large to draw")
        labels = np.asarray(im)  # L or P: the labels themselves
    if labels.ndim != 2:
        raise Unreadable("not a label image")
    mask = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    with open_slide(slide) as s:
        thumb = s.thumbnail(max(size))
    if thumb.shape[1::-1] != size:
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR))
    out = thumb.copy()
    lesion = mask > 0
    blend = (1 - OVERLAY_ALPHA) * thumb[lesion] + OVERLAY_ALPHA * colour_mask(mask[lesion]).astype(np.float32)
    out[lesion] = np.round(blend).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _truth_figure(b: Builder, r: SlideResult) -> str:
    if r.truth is None:
        return '<figure><p class="note">no ground truth found in the folder</p></figure>'
    if r.slide is not None and r.prediction is not None:
        try:
            from PIL import Image

            with Image.open(r.prediction) as im:
                size = im.size
            uri = truth_overlay(r.slide, r.truth, size)
            b.shown.add(r.truth)
            return (f'<figure><img src="{uri}" alt="{esc(r.truth.name)}">'
                    f"<figcaption>truth over the slide — <code>{esc(b.rel(r.truth))}</code></figcaption></figure>")
        except Exception:  # noqa: BLE001 - an unreadable slide only costs the tinted picture
            pass
    return b.figure(r.truth, "truth")


def _3(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def slides_html(b: Builder, found: Found) -> str:
    """Per evaluation: a table of the slides' scores, then prediction | truth side by side per slide."""
    parts = []
    for path, results in slide_results(b, found):
        models = {r.model for r in results if r.model is not None}
        by = f" segmented by {_model_name(b, models.pop())}" if len(models) == 1 else ""
        parts.append(f"<p>Whole test slides{by}, scored against the truth in <code>{esc(b.rel(path.parent))}</code> "
                     "(Dice and IoU: 1 = perfect overlap with the annotation, 0 = none):</p>")
        parts.append(table(["slide", "Dice", "mIoU", "Dice benign", "Dice malignant"],
                           [[r.stem, *(_3(v) for v in (r.dice, r.miou, *r.per_class.values()))] for r in results]))
        for i, r in enumerate(results):
            if i >= MAX_SLIDES:
                parts.append(f'<p class="note">{len(results) - i} more slide(s) in the Segmentation section.</p>')
                break
            if r.prediction is None and r.truth is None:
                continue
            score = f" — Dice {r.dice:.3f}" if r.dice is not None else ""
            b.in_summary.update(p for p in (r.prediction, r.truth) if p is not None)
            pred = (b.figure(r.prediction, "prediction over the slide" if r.prediction.name.endswith("_overlay.png")
                             else "prediction") if r.prediction is not None
                    else '<figure><p class="note">no prediction picture found</p></figure>')
            parts.append(f"<h4>{esc(r.stem)}{esc(score)}</h4>"
                         f'<div class="pair">{pred}{_truth_figure(b, r)}</div>')
    return "".join(parts)


__all__ = ["MAX_SLIDES", "SlideResult", "slide_results", "slides_html", "truth_overlay"]
