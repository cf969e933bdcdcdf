"""Training metrics on rank 0: one CSV row per `log` call plus TensorBoard event files, both in one folder.

CSV columns are `step` then every metric key in order of first appearance. A key seen for the first time
rewrites the file with the wider header (earlier rows get empty cells); otherwise a row is appended and
flushed, so a crashed run keeps everything logged so far. Rows already in the folder (a resumed run) are kept up
to the step the run restarts from; later ones are dropped, since those steps run again (each step appears once).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

CSV_NAME = "metrics.csv"
STEP = "step"


class MetricsWriter:
    """Rank 0 writes `metrics.csv` and TensorBoard events under out_dir; with enabled=False every call is a no-op."""

    def __init__(self, out_dir: Path, enabled: bool = True, start_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.csv_path = self.out_dir / CSV_NAME
        self._columns: list[str] = [STEP]
        self._rows: list[dict[str, Any]] = []
        self._tb: Any = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [STEP])
                self._rows = list(reader)
            if start_step is not None:
                kept = [row for row in self._rows if int(row[STEP]) <= start_step]
                if len(kept) < len(self._rows):
                    self._rows = kept
                    self._rewrite_csv()
        from tensorboardX import SummaryWriter  # imported here: ranks that never write need not load it

        self._tb = SummaryWriter(logdir=str(self.out_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row {step, **metrics} to the CSV and one scalar per key to TensorBoard."""
        if not self.enabled:
            return
        # float() accepts Python / numpy scalars and 0-dim tensors alike.
        values = {key: float(value) for key, value in metrics.items()}
        row = {STEP: int(step), **values}
        self._rows.append(row)
        new_keys = [key for key in values if key not in self._columns]
        if new_keys:
            self._columns.extend(new_keys)
            self._rewrite_csv()
        else:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)
        for key, value in values.items():
            if math.isfinite(value):  # TensorBoard charts break on NaN / inf; the CSV keeps them
                self._tb.add_scalar(key, value, global_step=int(step))
        self._tb.flush()

    def _rewrite_csv(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        tmp.replace(self.csv_path)  # atomic: a reader never sees a half-written header

    def close(self) -> None:
        """Flush and close the TensorBoard writer; the CSV is already complete after every `log`."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(csv_path: Path) -> pd.DataFrame:
    """metrics.csv -> one row per `log` call: `step` (int) and one float column per metric (NaN where unlogged)."""
    frame = pd.read_csv(csv_path)
    metric_columns = [c for c in frame.columns if c != STEP]
    return frame.astype({STEP: "int64", **{c: "float64" for c in metric_columns}})
