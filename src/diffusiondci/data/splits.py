"""Train / validation / test splits by group (patient or slide).

A group never spans two splits: groups are shuffled with a seed and dealt to ``test``, ``val`` and
``train`` by count (``round(fraction * n_groups)``, at least one group in every split that has a
non-zero fraction when there are enough groups, and at least one in ``train``).

Stratified (``composition`` given, ``prepare --stratify``): the same dealing, but out of many seeded
shuffles the one is kept whose validation and test splits come closest to the whole dataset's class
mix and to their share of patches. With few patients a plain shuffle can leave a split without a
class (GlaS at seed 0: 4.5 % benign pixels in validation), and then choices made there cannot see it.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import CLASS_NAMES
from ..errors import UserInputError

STEM_COLUMNS = ("slide", "stem", "name", "image", "slide_stem", "id")
GROUP_COLUMNS = ("group", "group_id", "patient_id", "patient", "case", "case_id")


def read_groups(path: str | Path) -> dict[str, str]:
    """Read a CSV mapping slide stems to group ids.

    The stem column is the first of ``slide, stem, name, image, ...`` present in the header,
    otherwise the first column; the group column the first of ``group, group_id, patient_id, ...``,
    otherwise the second. GlaS's ``manifest.csv`` (``name, patient_id, ...``) works as it is.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read groups CSV ({exc})", path) from exc
    if len(rows) < 2 or len(rows[0]) < 2:
        raise UserInputError("groups CSV needs a header and two columns: slide stem, group id", path)
    header = [h.strip().lower() for h in rows[0]]
    stem_col = next((header.index(c) for c in STEM_COLUMNS if c in header), 0)
    group_col = next((header.index(c) for c in GROUP_COLUMNS if c in header), 1 if stem_col != 1 else 0)
    groups: dict[str, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(stem_col, group_col):
            raise UserInputError(f"line {line_no} has too few columns", path)
        stem = Path(row[stem_col].strip()).stem if "." in row[stem_col] else row[stem_col].strip()
        groups[stem] = row[group_col].strip()
    return groups


def assign_splits(
    groups: Iterable[str], val_fraction: float, test_fraction: float, seed: int,
    composition: Mapping[str, Sequence[float]] | None = None, candidates: int = 2000,
) -> dict[str, str]:
    """Map each distinct group id to ``train``, ``val`` or ``test``.

    ``composition``: group id -> ``[patches, class 0 amount, class 1 amount, ...]`` (e.g. summed class
    fractions of its labelled patches). When given, ``candidates`` seeded shuffles are dealt and the
    one with the lowest :func:`split_imbalance` is kept; the first candidate is the plain shuffle, so
    the result is never worse than the unstratified split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must each be in [0, 1) "
            "and sum below 1 (the rest is training data)"
        )
    unique = sorted(set(groups))
    rng = random.Random(seed)
    rng.shuffle(unique)
    if composition is None:
        return _deal(unique, val_fraction, test_fraction)
    missing = [g for g in unique if g not in composition]
    if missing:
        raise ValueError(f"no composition for groups {missing[:5]}")
    matrix = {g: np.asarray(composition[g], dtype=float) for g in unique}
    fractions = {"val": val_fraction, "test": test_fraction}
    best, best_cost = None, float("inf")
    for _ in range(max(int(candidates), 1)):
        split = _deal(unique, val_fraction, test_fraction)
        cost = split_imbalance(split, matrix, fractions)
        if cost < best_cost - 1e-12:
            best, best_cost = split, cost
        rng.shuffle(unique)
    return best


def _deal(order: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    n = len(order)

    def count(fraction: float) -> int:
        k = round(fraction * n)
        return max(k, 1) if fraction > 0 and n >= 2 else k

    n_test = count(test_fraction)
    n_val = min(count(val_fraction), max(n - n_test - 1, 0))
    n_test = min(n_test, max(n - 1, 0))
    out = {g: "test" for g in order[:n_test]}
    out.update({g: "val" for g in order[n_test : n_test + n_val]})
    out.update({g: "train" for g in order[n_test + n_val :]})
    return out


def split_imbalance(split: Mapping[str, str], composition: Mapping[str, Sequence[float]],
                    fractions: Mapping[str, float]) -> float:
    """How far the held-out splits are from the whole: for each split with a non-zero wanted fraction,
    the total-variation distance between its class mix and the dataset's (0 equal, 1 disjoint) plus
    the gap between its share of patches and the wanted fraction. 0 is perfect."""
    rows = {g: np.asarray(v, dtype=float) for g, v in composition.items() if g in split}
    total = np.sum(list(rows.values()), axis=0)
    mix = total[1:] / max(total[1:].sum(), 1e-12)
    cost = 0.0
    for name, wanted in fractions.items():
        if wanted <= 0:
            continue
        part = sum((rows[g] for g, s in split.items() if s == name), np.zeros_like(total))
        part_mix = part[1:] / part[1:].sum() if part[1:].sum() > 0 else np.zeros_like(mix)
        cost += 0.5 * float(np.abs(part_mix - mix).sum()) + abs(part[0] / max(total[0], 1e-12) - wanted)
    return cost


def group_composition(rows: Iterable[Mapping], classes: Sequence[str]) -> dict[str, list[float]]:
    """``[patches, sum of frac_<class> ...]`` per manifest group; unlabelled patches (empty fractions)
    count as patches only."""
    out: dict[str, list[float]] = {}
    for row in rows:
        acc = out.setdefault(str(row["group"]), [0.0] * (1 + len(classes)))
        acc[0] += 1
        for k, name in enumerate(classes, start=1):
            value = row.get(f"frac_{name}", "")
            if value not in ("", None):
                acc[k] += float(value)
    return out


def split_mix_line(rows: Iterable[Mapping], classes: Sequence[str] = CLASS_NAMES) -> str:
    """One line for the log: patches and labelled class mix (%) of each split of manifest rows."""
    rows = list(rows)
    parts = []
    for name in ("train", "val", "test"):
        members = [r for r in rows if r.get("split") == name]
        if not members:
            continue
        comp = np.sum(list(group_composition(members, classes).values()), axis=0)
        mix = comp[1:] / comp[1:].sum() * 100 if comp[1:].sum() > 0 else None
        mix_text = "/".join(f"{m:.0f}" for m in mix) if mix is not None else "unlabelled"
        parts.append(f"{name} {len(members)} ({mix_text} %)")
    return "class mix per split (" + "/".join(classes) + "): " + ", ".join(parts)
