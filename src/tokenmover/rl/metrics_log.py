"""Where step metrics go: a CSV file (main process), accelerate's trackers (TensorBoard), the console.

The CSV holds one row per step with a fixed header (the first row's keys; later keys that were not
there are dropped, missing ones left empty). A fresh run (``resume_step=None``) replaces an existing
file. Otherwise rows after ``resume_step`` are removed and new rows are appended under the file's
header: on resume that is the checkpoint's step, so the file reads as one uninterrupted run; a
later ``train()`` call of the same trainer passes its current step, which keeps every row.

TensorBoard follows the same rule: each ``MetricsLog`` opens a new event file whose writer is given
``purge_step = resume_step + 1`` (1 for a fresh run), so TensorBoard discards the events of earlier
files at that step and after (a resumed run does not show its redone steps twice), and its trackers
are closed and removed from the accelerator on ``close()`` (a later ``train()`` call does not log
every step through a second writer).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


def format_metric(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    return str(value)


class MetricsLog:
    """CSV writer plus accelerate tracker logging; only the main process writes."""

    def __init__(self, output_dir: str | Path, report_to: list[str], accelerator, *, resume_step: int | None = None,
                 tracker_config: dict | None = None) -> None:
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.csv_path = Path(output_dir) / "metrics.csv" if "csv" in report_to else None
        self.use_trackers = "tensorboard" in report_to
        self.header: list[str] | None = None
        self._trackers: list = []
        if self.use_trackers:
            before = list(accelerator.trackers)
            purge = {"tensorboard": {"purge_step": (resume_step or 0) + 1}}
            accelerator.init_trackers("tensorboard", config=_scalar_config(tracker_config or {}), init_kwargs=purge)
            self._trackers = [t for t in accelerator.trackers if not any(t is b for b in before)]
        if self.csv_path is not None and self.is_main:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.csv_path.is_file():
                self._truncate(resume_step)
            elif self.csv_path.exists():
                self.csv_path.unlink()

    def _truncate(self, step: int) -> None:
        with self.csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
            rows = [row for row in reader if int(row["step"]) <= step]
        self.header = list(header) if header else None
        with self.csv_path.open("w", newline="", encoding="utf-8") as fh:
            if self.header:
                writer = csv.DictWriter(fh, fieldnames=self.header)
                writer.writeheader()
                writer.writerows(rows)

    def log(self, metrics: dict, step: int) -> None:
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.csv_path is None or not self.is_main:
            return
        new = self.header is None
        if new:
            self.header = list(metrics)
        with self.csv_path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.header, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: format_metric(v) for k, v in metrics.items()})

    def close(self) -> None:
        """Finish this log's trackers and drop them from the accelerator (the process group stays up)."""
        for tracker in self._trackers:
            tracker.finish()
        ours = self._trackers
        self.accelerator.trackers[:] = [t for t in self.accelerator.trackers if not any(t is o for o in ours)]
        self._trackers = []


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """A metrics CSV as a list of dicts of floats (empty cells become NaN)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
                for row in csv.DictReader(fh)]


def _scalar_config(config: dict) -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    out = {}
    for key, value in config.items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
