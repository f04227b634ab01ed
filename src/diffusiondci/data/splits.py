"""Train / validation / test splits by group (patient or slide).

A group never spans two splits: groups are shuffled with a seed and dealt to ``test``, ``val`` and
``train`` by count (``round(fraction * n_groups)``, at least one group in every split that has a
non-zero fraction when there are enough groups, and at least one in ``train``).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable
from pathlib import Path

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
    groups: Iterable[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Map each distinct group id to ``train``, ``val`` or ``test``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must each be in [0, 1) "
            "and sum below 1 (the rest is training data)"
        )
    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    n = len(unique)

    def count(fraction: float) -> int:
        k = round(fraction * n)
        return max(k, 1) if fraction > 0 and n >= 2 else k

    n_test = count(test_fraction)
    n_val = min(count(val_fraction), max(n - n_test - 1, 0))
    n_test = min(n_test, max(n - 1, 0))
    out = {g: "test" for g in unique[:n_test]}
    out.update({g: "val" for g in unique[n_test : n_test + n_val]})
    out.update({g: "train" for g in unique[n_test + n_val :]})
    return out
