"""What a run leaves for its user in `output_dir/<stage>_metrics/`, read in this order:

  summary.json          status, steps, wall time, and per metric: first, last, min, max, mean of the last 10%
  training_curves.png   one panel per topic found in the metrics (ppo: reward, KL, β, losses, clip fractions,
                        entropy, response length, explained variance; rm: loss, accuracy; sft: loss)
  training_metrics.csv  one row per logged step; the columns are the union of every row's keys (blank if absent)
  samples.jsonl         ppo: {"step", "prompt", "response", "score"} rows
  events.jsonl          ppo: {"step", "event", ...} rows: rejected iterations, rollbacks, stops (also printed)

Every file is written to a temporary name and moved into place with `os.replace`, so a reader (or a killed
run) never sees a half-written file. In a multi-host run only process 0 writes (`primary=False` elsewhere: the
rows, events and summary are kept in memory, nothing is written or printed). A tqdm bar shows live reward and
KL; TensorBoard event files are written only if `tensorboardX` or `torch.utils.tensorboard` (with `tensorboard`)
is already installed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# (panel title, candidate metric names; the first few present are drawn).
PANELS = {
    "ppo": (
        ("reward", ("objective/scores", "objective/rlhf_reward", "score", "reward")),
        ("KL to reference (nats / sequence)", ("objective/kl", "kl")),
        ("KL coefficient β", ("objective/kl_coef", "kl_coef")),
        ("policy loss", ("loss/policy", "policy_loss")),
        ("value loss", ("loss/value", "value_loss")),
        ("clip fractions", ("policy/clipfrac", "policy/clipfrac_lower", "value/clipfrac", "clipfrac")),
        ("entropy", ("objective/entropy", "entropy")),
        ("response length", ("response/length_mean", "response_length")),
        ("explained variance", ("value/explained_variance", "explained_variance")),
    ),
    "rm": (("loss", ("loss", "train/loss")), ("accuracy", ("accuracy", "train/accuracy"))),
    "sft": (("loss", ("loss", "train/loss")),),
}
REWARD_KEYS = ("objective/scores", "objective/rlhf_reward", "score", "reward")
KL_KEYS = ("objective/kl", "kl")
STEP = "step"


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and `os.replace`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _scalar(value) -> Optional[float]:
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return None


def read_metrics_csv(path: str) -> list[dict]:
    """Rows of a training_metrics.csv as {column: float} (blank cells omitted)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _first(row_keys: Iterable[str], candidates: Sequence[str]) -> Optional[str]:
    keys = set(row_keys)
    return next((c for c in candidates if c in keys), None)


class MetricsWriter:
    """Collects per-step metrics of one stage and keeps the report files current.

    `resume_step`: continue an earlier run's files, keeping its rows up to that step (later ones belonged to
    steps that the resumed state has not done). `total`: steps expected, for the progress bar. `primary`:
    False in every process of a multi-host run but the first: the same rows and summary, no file, bar or line.
    """

    def __init__(
        self,
        output_dir: str,
        stage: str,
        *,
        total: Optional[int] = None,
        resume_step: Optional[int] = None,
        tensorboard: bool = False,
        progress: bool = True,
        plot_every: int = 10,
        primary: bool = True,
    ):
        self.stage = stage
        self.primary = primary
        self.directory = os.path.join(os.path.abspath(output_dir), f"{stage}_metrics")
        if primary:
            os.makedirs(self.directory, exist_ok=True)
        self.rows: list[dict] = []
        self._events: list[dict] = []
        self.columns: list[str] = [STEP]
        self.plot_every = max(1, plot_every)
        self._start = time.time()
        if resume_step is not None and os.path.exists(self.csv_path):
            for row in read_metrics_csv(self.csv_path):
                if row.get(STEP, math.inf) <= resume_step:
                    self._add(row)
        if resume_step is not None and os.path.exists(self.events_path):
            with open(self.events_path, encoding="utf-8") as f:
                self._events = [json.loads(line) for line in f if line.strip()]
        if primary and resume_step is not None and os.path.exists(self.samples_path):
            self._keep_samples_until(resume_step)
        if primary and resume_step is None:
            for stale in (self.csv_path, self.samples_path, self.summary_path, self.plot_path, self.events_path):
                if os.path.exists(stale):
                    os.remove(stale)
        self._bar = None
        if progress and primary:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=int(resume_step or 0), desc=f"ppojax {stage}", unit="step", dynamic_ncols=True
            )
        self._tb = None
        if tensorboard and primary:
            self._tb = make_tensorboard_writer(os.path.join(self.directory, "tensorboard"))
        # Set by the run (ppojax.health, stages): a note for the progress bar, (first, last, check, severity,
        # metric) spans shaded on the panels of their metric, (x, label) marks drawn as vertical lines (stages).
        self.note: Optional[str] = None
        self.spans: list = []
        self.marks: list = []
        self.tensorboard_available = self._tb is not None

    # ---- paths ---------------------------------------------------------------------------------------

    @property
    def csv_path(self) -> str:
        return os.path.join(self.directory, "training_metrics.csv")

    @property
    def summary_path(self) -> str:
        return os.path.join(self.directory, "summary.json")

    @property
    def plot_path(self) -> str:
        return os.path.join(self.directory, "training_curves.png")

    @property
    def samples_path(self) -> str:
        return os.path.join(self.directory, "samples.jsonl")

    @property
    def events_path(self) -> str:
        return os.path.join(self.directory, "events.jsonl")

    # ---- writing -------------------------------------------------------------------------------------

    def _add(self, row: dict) -> None:
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows.append(row)

    def log(self, step: int, metrics: dict) -> dict:
        """Adds one row (non-scalar and non-numeric values are dropped), rewrites the CSV, updates the bar,
        TensorBoard and (every `plot_every` rows) the plot. Returns the row."""
        row = {STEP: int(step)}
        for key, value in metrics.items():
            number = _scalar(value)
            if number is not None:
                row[key] = number
        self._add(row)
        self._write_csv()
        if self._bar is not None:
            reward, kl = _first(row, REWARD_KEYS), _first(row, KL_KEYS)
            shown = {name: f"{row[key]:.3g}" for name, key in (("reward", reward), ("kl", kl)) if key}
            if "loss" in row and not shown:
                shown["loss"] = f"{row['loss']:.3g}"
            if self.note:
                shown["health"] = self.note
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(max(0, int(step) - self._bar.n))
        if self._tb is not None:
            for key, value in row.items():
                if key != STEP:
                    self._tb.add_scalar(key, value, int(step))
        if len(self.rows) % self.plot_every == 0:
            self.plot()
        return row

    def _write_csv(self) -> None:
        if not self.primary:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write(self.csv_path, out.getvalue())

    def samples(self, step: int, prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float]) -> None:
        """Appends {"step", "prompt", "response", "score"} rows to samples.jsonl (rewritten atomically)."""
        if not self.primary:
            return
        lines = "".join(
            json.dumps({"step": int(step), "prompt": p, "response": r, "score": _scalar(s)}, ensure_ascii=False) + "\n"
            for p, r, s in zip(prompts, responses, scores)
        )
        old = ""
        if os.path.exists(self.samples_path):
            with open(self.samples_path, encoding="utf-8") as f:
                old = f.read()
        atomic_write(self.samples_path, old + lines)

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step` without logging a row."""
        if self._bar is not None:
            self._bar.update(max(0, int(step) - self._bar.n))

    def truncate(self, step: int) -> None:
        """Forgets rows and samples of steps after `step` (a rollback abandons them; events.jsonl keeps the record)."""
        self.rows = [row for row in self.rows if row[STEP] <= step]
        self._write_csv()
        if self.primary and os.path.exists(self.samples_path):
            self._keep_samples_until(step)
        if self._bar is not None:
            self._bar.reset(total=self._bar.total)
            self._bar.update(int(step))

    def _keep_samples_until(self, step: int) -> None:
        """Drops samples.jsonl rows of steps after `step` (a resumed run redoes those steps)."""
        with open(self.samples_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.samples_path, "".join(lines))

    def event(self, step: int, event: str, **detail: Any) -> dict:
        """Appends {"step", "event", **detail} to events.jsonl and prints it (above the progress bar)."""
        row = {"step": int(step), "event": event, **detail}
        self._events.append(json.loads(json.dumps(row, default=str)))  # as read back from the file
        if self.primary:
            old = ""
            if os.path.exists(self.events_path):
                with open(self.events_path, encoding="utf-8") as f:
                    old = f.read()
            atomic_write(self.events_path, old + json.dumps(row, default=str) + "\n")
        self.say(f"ppojax {self.stage} step {int(step)}: {event}" + "".join(f"; {k} {v}" for k, v in detail.items()))
        return row

    def say(self, text: str) -> None:
        """Prints a line above the progress bar (stderr without one); nothing in a non-primary process."""
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr)

    def read_events(self) -> list[dict]:
        """Every event of the run (a resumed run's earlier ones included), as events.jsonl holds them."""
        return [dict(row) for row in self._events]

    def summary(self, status: str = "running", **extra: Any) -> dict:
        """Writes summary.json: status, steps, wall time, per-metric first / last / min / max / tail mean."""
        metrics = {}
        for key in self.columns:
            if key == STEP:
                continue
            values = np.array([row[key] for row in self.rows if key in row], np.float64)
            finite = values[np.isfinite(values)]
            if not len(finite):
                continue
            tail = finite[-max(1, len(finite) // 10) :]
            metrics[key] = {
                "first": finite[0],
                "last": finite[-1],
                "min": finite.min(),
                "max": finite.max(),
                "mean_last_10pct": tail.mean(),
            }
        summary = {
            "stage": self.stage,
            "status": status,
            "steps_logged": len(self.rows),
            "last_step": self.rows[-1][STEP] if self.rows else None,
            "wall_time_s": round(time.time() - self._start, 3),
            "files": {
                "csv": os.path.basename(self.csv_path),
                "plot": os.path.basename(self.plot_path),
                "samples": os.path.basename(self.samples_path) if os.path.exists(self.samples_path) else None,
                "events": os.path.basename(self.events_path) if os.path.exists(self.events_path) else None,
            },
            "metrics": {k: {s: float(v) for s, v in d.items()} for k, d in metrics.items()},
            **extra,
        }
        if self.primary:
            atomic_write(self.summary_path, json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
        return summary

    def plot(self) -> Optional[str]:
        """Draws training_curves.png with matplotlib's Agg backend; None when there is nothing to draw (or the
        process is not the primary one)."""
        if not self.primary:
            return None
        panels = []
        for title, candidates in PANELS.get(self.stage, ()):
            keys = [c for c in candidates if c in self.columns]
            if keys:
                panels.append((title, keys[:4]))
        if not panels:  # an unknown stage or unexpected names: plot whatever there is
            panels = [(key, [key]) for key in self.columns if key != STEP][:12]
        if not panels or not self.rows:
            return None
        from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the global backend alone

        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        figure = Figure(figsize=(4.5 * cols, 3.2 * rows), dpi=80)
        for i, (title, keys) in enumerate(panels):
            axes = figure.add_subplot(rows, cols, i + 1)
            for key in keys:
                points = [(row[STEP], row[key]) for row in self.rows if key in row]
                axes.plot([p[0] for p in points], [p[1] for p in points], label=key, linewidth=1.2)
            axes.set_title(title, fontsize=10)
            axes.set_xlabel(STEP, fontsize=8)
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            self._draw_spans_and_marks(axes, keys, label=i == 0)
            if len(keys) > 1:
                axes.legend(fontsize=7)
        figure.suptitle(f"ppojax {self.stage}", fontsize=11)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        atomic_write(self.plot_path, buffer.getvalue())
        return self.plot_path

    _SPAN_COLOURS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:gray"}

    def _draw_spans_and_marks(self, axes, keys, *, label: bool) -> None:
        """Shades each span on the panels that plot its metric; draws every mark on every panel."""
        for first, last, _check, severity, metric in self.spans:
            if any(name in keys for name in metric.split(", ")):
                colour = self._SPAN_COLOURS.get(severity, "tab:red")
                axes.axvspan(first - 0.5, last + 0.5, color=colour, alpha=0.15, lw=0)
        for x, text in self.marks:
            axes.axvline(x, color="tab:purple", linestyle="--", linewidth=0.8)
            if label:
                axes.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=6, rotation=90, va="top")

    def close(self, status: str = "completed", **extra: Any) -> dict:
        """Final plot and summary; closes the bar and TensorBoard."""
        self.plot()
        summary = self.summary(status, **extra)
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        return summary


def make_tensorboard_writer(logdir: str):
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard if one is installed, else None.
    Nothing is installed for it: TensorBoard is optional."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter  # type: ignore
    elif importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
        from torch.utils.tensorboard import SummaryWriter  # type: ignore
    else:
        return None  # checked by name first: importing torch just to find it lacks tensorboard costs seconds
    return SummaryWriter(logdir)
