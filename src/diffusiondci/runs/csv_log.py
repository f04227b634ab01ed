"""``log.csv`` of a run: one row per logged step, a header that grows with new metric names."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class CsvLog:
    """``log.csv`` with a header that grows when new metric names appear (file rewritten then).

    ``keep_until_step``: when resuming, the rows up to this step are kept and later ones (written
    by the killed run after its last checkpoint) dropped; None starts a new file.
    """

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.fields: list[str] = []
        if keep_until_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self.fields = list(reader.fieldnames or [])
                for row in reader:  # rows after the resumed checkpoint are from the killed tail
                    try:
                        if int(float(row.get("step") or 0)) <= keep_until_step:
                            self.rows.append(row)
                    except ValueError:
                        continue
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, restval="", lineterminator="\n")
            w.writeheader()
            w.writerows(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        self.rows.append(row)
        if new:
            head = [k for k in ("step", "epoch") if k in self.fields or k in row]
            rest = [k for k in self.fields + new if k not in ("step", "epoch", "wall_time")]
            self.fields = head + rest + ["wall_time"]
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, restval="", lineterminator="\n").writerow(row)
