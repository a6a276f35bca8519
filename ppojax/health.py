"""A metric health report: the ranges practitioners watch while PPO-RLHF runs, checked over a metric history.

The checks (each over the metric named in `METRICS`, looked up under its first present candidate name):

  check               healthy when                                               severity
  kl                  KL to the reference (nats / sequence) <= max_kl (10)        critical
  ratio               |mean ratio π/π_old − 1| <= ratio_tolerance (0.1)           critical
  clipfrac_high       clip fraction <= 30 %   (above: updates too aggressive)     warning
  clipfrac_low        clip fraction >= 10 %   (below: updates timid)              info
  explained_variance  explained variance > 0  (else the critic has learnt nothing) warning
  reward_falling      the smoothed reward did not fall in each of the last N       critical
                      iterations (N = reward_window, 5; EMA smoothing 0.6)
  entropy_collapse    entropy >= entropy_floor (0.3) × its starting value          critical
  length_drift        start / factor <= mean response length <= start × factor    warning
                      (factor 2: longer is length hacking, shorter truncation)
  non_finite          every watched metric finite (NaN / inf means the run broke)  critical

"Starting value" is the mean of the first `baseline_iterations` logged values. A history is a list of dicts
(one per logged iteration, as `reports.MetricsWriter` rows) or a dict of equal-length arrays; the iteration
number of a row is its "step" (or "iteration") entry, else its index. A metric absent from the history is
not checked (listed under "unchecked"). Everything here is a pure function of the history: call
`check_health` after each iteration and render the result with `HealthReport.to_json` (summary.json),
`HealthReport.line` (the progress line) and `HealthReport.spans` (shading on the curves).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

# check -> candidate metric names (train.py's names first, then the short forms reports.py also accepts).
METRICS = {
    "kl": ("objective/kl", "kl"),
    "ratio": ("policy/ratio_mean", "ratio_mean", "ratio"),
    "clipfrac": ("policy/clipfrac", "clipfrac"),
    "explained_variance": ("value/explained_variance", "explained_variance"),
    "reward": ("objective/scores", "objective/rlhf_reward", "score", "reward"),
    "entropy": ("objective/entropy", "entropy"),
    "length": ("response/length_mean", "response_length"),
}
ITERATION_KEYS = ("step", "iteration")
SEVERITIES = ("critical", "warning", "info")

History = Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[float]]]


@dataclasses.dataclass(frozen=True)
class HealthLimits:
    """Where each check draws the line (defaults: the practitioners' playbook)."""

    max_kl: float = 10.0  # nats per sequence
    ratio_tolerance: float = 0.1
    clipfrac_low: float = 0.10
    clipfrac_high: float = 0.30
    min_explained_variance: float = 0.0  # healthy strictly above
    reward_window: int = 5
    reward_smoothing: float = 0.6  # EMA weight of the past (0: raw values)
    entropy_floor: float = 0.3  # fraction of the starting entropy
    length_factor: float = 2.0
    baseline_iterations: int = 1

    def __post_init__(self):
        problems = []
        if not self.max_kl > 0:
            problems.append(f"max_kl must be > 0, got {self.max_kl}")
        if not self.ratio_tolerance > 0:
            problems.append(f"ratio_tolerance must be > 0, got {self.ratio_tolerance}")
        if not 0 <= self.clipfrac_low <= self.clipfrac_high <= 1:
            problems.append(
                f"need 0 <= clipfrac_low <= clipfrac_high <= 1, got {self.clipfrac_low}, {self.clipfrac_high}"
            )
        if self.reward_window < 1:
            problems.append(f"reward_window must be >= 1, got {self.reward_window}")
        if not 0 <= self.reward_smoothing < 1:
            problems.append(f"reward_smoothing must be in [0, 1), got {self.reward_smoothing}")
        if not 0 < self.entropy_floor < 1:
            problems.append(f"entropy_floor must be in (0, 1), got {self.entropy_floor}")
        if not self.length_factor > 1:
            problems.append(f"length_factor must be > 1, got {self.length_factor}")
        if self.baseline_iterations < 1:
            problems.append(f"baseline_iterations must be >= 1, got {self.baseline_iterations}")
        if problems:
            raise ValueError("HealthLimits: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Violation:
    """One contiguous run of iterations where a check failed. `began` / `ended` are iteration numbers (the
    first and last failing ones); `worst` is the metric's most extreme value in the run."""

    check: str
    metric: str
    severity: str
    began: int
    ended: int
    ongoing: bool  # the run reaches the last logged iteration
    worst: float
    message: str

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "worst": _json_number(self.worst)}


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """The result of `check_health`. `checked`: check -> metric name used; `unchecked`: checks whose metric
    is absent. `violations` are in order of the iteration where they began."""

    violations: tuple[Violation, ...]
    checked: Mapping[str, str]
    unchecked: tuple[str, ...]
    last_iteration: Optional[int]
    limits: HealthLimits

    @property
    def ok(self) -> bool:
        """No violation is ongoing at the last iteration."""
        return not any(v.ongoing for v in self.violations)

    @property
    def ongoing(self) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.ongoing)

    def to_json(self) -> dict:
        """A JSON-able dict for summary.json."""
        return {
            "ok": self.ok,
            "last_iteration": self.last_iteration,
            "ongoing": [v.check for v in self.ongoing],
            "violations": [v.to_json() for v in self.violations],
            "checked": dict(self.checked),
            "unchecked": list(self.unchecked),
            "limits": dataclasses.asdict(self.limits),
        }

    def line(self, max_items: int = 3) -> str:
        """One line for a progress bar: "ok", or the ongoing violations with the iteration they began."""
        past = len(self.violations) - len(self.ongoing)
        if self.ok:
            return "ok" if not past else f"ok ({past} earlier)"
        order = {s: i for i, s in enumerate(SEVERITIES)}
        ongoing = sorted(self.ongoing, key=lambda v: (order[v.severity], v.began))
        items = [f"{_SHORT[v.check]} since {v.began}" for v in ongoing[:max_items]]
        if len(ongoing) > max_items:
            items.append(f"+{len(ongoing) - max_items} more")
        return "; ".join(items)

    def spans(self) -> list[tuple[int, int, str, str, str]]:
        """(began, ended, check, severity, metric) per violation, for shading the curves between iterations
        (`metric` is the name of the metric checked, or several joined by ", " for non_finite)."""
        return [(v.began, v.ended, v.check, v.severity, v.metric) for v in self.violations]


_SHORT = {
    "kl": "KL high",
    "ratio": "ratio off 1",
    "clipfrac_high": "clipfrac high",
    "clipfrac_low": "clipfrac low",
    "explained_variance": "expl.var <= 0",
    "reward_falling": "reward falling",
    "entropy_collapse": "entropy collapse",
    "length_drift": "length drift",
    "non_finite": "non-finite",
}


# ----------------------------------------------------------------------------------------------------------
# Reading a history


def _json_number(x: float):
    return float(x) if math.isfinite(x) else str(x)


def history_columns(history: History) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(iterations [N] int, values {name: [N] float64}, present {name: [N] bool}) of a history.

    A list of dicts may have keys missing from some rows (`present` False there); a value that is not a
    number is an error naming the row and key.
    """
    if isinstance(history, Mapping):
        lengths = {k: len(v) for k, v in history.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"check_health: the history's arrays differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        rows = [{k: history[k][i] for k in history} for i in range(n)]
    else:
        rows = list(history)
    names = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    values = {k: np.full(len(rows), np.nan) for k in names}
    present = {k: np.zeros(len(rows), bool) for k in names}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            try:
                values[key][i] = float(np.asarray(value, dtype=np.float64).reshape(()))
            except (TypeError, ValueError):
                raise ValueError(
                    f"check_health: row {i} key {key!r} is {value!r}; expected a number (or absent)"
                ) from None
            present[key][i] = True
    iteration_key = next((k for k in ITERATION_KEYS if k in present and present[k].all()), None)
    iterations = values[iteration_key].astype(np.int64) if iteration_key else np.arange(len(rows), dtype=np.int64)
    return iterations, values, present


# ----------------------------------------------------------------------------------------------------------
# The checks: each maps a metric's finite logged values x [n] to (bad [n] bool, what the rule is, badness [n]);
# a violation's `worst` is the value of x where badness is largest within its run.


def _baseline(x: np.ndarray, limits: HealthLimits) -> float:
    return float(np.mean(x[: limits.baseline_iterations]))


def ema(x: np.ndarray, smoothing: float) -> np.ndarray:
    """TensorBoard-style smoothing: s_0 = x_0, s_i = smoothing · s_{i−1} + (1 − smoothing) · x_i."""
    out = np.empty(len(x), np.float64)
    for i, v in enumerate(x):
        out[i] = v if i == 0 else smoothing * out[i - 1] + (1 - smoothing) * v
    return out


def falling_runs(x: np.ndarray, window: int) -> np.ndarray:
    """True on every point of a strictly falling stretch of at least `window` steps, from its first lower
    point (the one after the peak) to its end."""
    bad = np.zeros(len(x), bool)
    i = 1
    while i < len(x):
        if x[i] < x[i - 1]:
            j = i
            while j + 1 < len(x) and x[j + 1] < x[j]:
                j += 1
            if j - i + 1 >= window:
                bad[i : j + 1] = True
            i = j + 1
        else:
            i += 1
    return bad


def _check_kl(x, limits):
    return x > limits.max_kl, f"KL to the reference above {limits.max_kl:g} nats / sequence", x


def _check_ratio(x, limits):
    deviation = np.abs(x - 1.0)
    return deviation > limits.ratio_tolerance, f"mean ratio π/π_old outside 1 ± {limits.ratio_tolerance:g}", deviation


def _check_clipfrac_high(x, limits):
    return x > limits.clipfrac_high, f"clip fraction above {limits.clipfrac_high:.0%}", x


def _check_clipfrac_low(x, limits):
    return x < limits.clipfrac_low, f"clip fraction below {limits.clipfrac_low:.0%}", -x


def _check_explained_variance(x, limits):
    return x <= limits.min_explained_variance, f"explained variance <= {limits.min_explained_variance:g}", -x


def _check_reward(x, limits):
    bad = falling_runs(ema(x, limits.reward_smoothing), limits.reward_window)
    return bad, f"smoothed reward fell {limits.reward_window}+ iterations in a row", -x


def _check_entropy(x, limits):
    start = _baseline(x, limits)
    floor = limits.entropy_floor * start
    return x < floor, f"entropy below {limits.entropy_floor:g} × its start {start:.4g} = {floor:.4g}", -x


def _check_length(x, limits):
    start = _baseline(x, limits)
    if start <= 0:  # no baseline to drift from
        return np.zeros(len(x), bool), "no positive starting length", np.zeros(len(x))
    factor = limits.length_factor
    drift = np.abs(np.log(np.maximum(x, 1e-12) / start))
    text = f"mean response length outside [{start / factor:.4g}, {start * factor:.4g}] (start {start:.4g}, factor {factor:g})"
    return drift > math.log(factor), text, drift


# check -> (metric, rule, severity, advice).
CHECKS = {
    "kl": (
        "kl",
        _check_kl,
        "critical",
        "raise the KL coefficient or lower the learning rate; roll back to a checkpoint before it began",
    ),
    "ratio": (
        "ratio",
        _check_ratio,
        "critical",
        "updates too large, or old and new log-probs disagree (temperature, dropout, padding)",
    ),
    "clipfrac_high": (
        "clipfrac",
        _check_clipfrac_high,
        "warning",
        "updates too aggressive: lower the learning rate, ppo_epochs or cliprange",
    ),
    "clipfrac_low": (
        "clipfrac",
        _check_clipfrac_low,
        "info",
        "updates are timid: the learning rate or cliprange could be larger",
    ),
    "explained_variance": (
        "explained_variance",
        _check_explained_variance,
        "warning",
        "the critic predicts returns no better than their mean: check its learning rate and initialisation",
    ),
    "reward_falling": (
        "reward",
        _check_reward,
        "critical",
        "policy collapse or reward-model drift: lower the learning rate, raise the KL coefficient, read samples",
    ),
    "entropy_collapse": (
        "entropy",
        _check_entropy,
        "critical",
        "the policy is collapsing onto few tokens (repetition): raise the KL coefficient or the entropy bonus",
    ),
    "length_drift": (
        "length",
        _check_length,
        "warning",
        "longer: likely length hacking (try a length-aware reward); shorter: responses cut or degenerating",
    ),
}


def _runs(bad: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last)] index pairs of the True runs of a bool array."""
    edges = np.diff(np.concatenate([[0], bad.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), (np.nonzero(edges == -1)[0] - 1).tolist()))


def check_health(history: History, limits: HealthLimits = HealthLimits()) -> HealthReport:
    """Checks a metric history against `limits`; see the module docstring for the checks."""
    iterations, values, present = history_columns(history)
    last = int(iterations[-1]) if len(iterations) else None
    violations, checked, unchecked = [], {}, []
    watched = {}  # metric name -> (row indices where logged, values there)

    def add(check, metric, severity, first_row, last_row, worst, text, advice):
        began, ended = int(iterations[first_row]), int(iterations[last_row])
        message = f"{text} from iteration {began} to {ended}: {advice}"
        violations.append(Violation(check, metric, severity, began, ended, ended == last, worst, message))

    for check, (metric, rule, severity, advice) in CHECKS.items():
        name = next((c for c in METRICS[metric] if c in present and present[c].any()), None)
        if name is None:
            unchecked.append(check)
            continue
        checked[check] = name
        rows = np.nonzero(present[name])[0]
        watched[name] = (rows, values[name][rows])
        finite = np.isfinite(values[name][rows])
        rows = rows[finite]
        if not len(rows):
            continue
        x = values[name][rows]
        bad, rule_text, badness = rule(x, limits)
        for first, final in _runs(bad):
            worst = float(x[first + int(np.argmax(badness[first : final + 1]))])
            add(check, name, severity, rows[first], rows[final], worst, f"{rule_text} (worst {worst:.4g})", advice)

    # A NaN passes every comparison above silently: one check over every watched metric.
    if watched:
        checked["non_finite"] = ", ".join(watched)
        bad = np.zeros(len(iterations), bool)
        for rows, x in watched.values():
            bad[rows[~np.isfinite(x)]] = True
        for first, final in _runs(bad):
            names = [
                n for n, (rows, x) in watched.items() if np.any(~np.isfinite(x[(rows >= first) & (rows <= final)]))
            ]
            advice = "the run broke; roll back and lower the learning rate"
            add(
                "non_finite",
                ", ".join(names),
                "critical",
                first,
                final,
                math.nan,
                f"{', '.join(names)} not finite",
                advice,
            )
    else:
        unchecked.append("non_finite")
    order = list(CHECKS) + ["non_finite"]
    violations.sort(key=lambda v: (v.began, order.index(v.check)))
    return HealthReport(tuple(violations), checked, tuple(unchecked), last, limits)
