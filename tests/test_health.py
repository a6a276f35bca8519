"""The metric health report: each check fires on a constructed history, and a healthy history is quiet."""

import json
import math
import os

import numpy as np
import pytest

from ppojax.health import CHECKS, HealthLimits, check_health, ema, falling_runs

N = 30
STEPS = [10 * (i + 1) for i in range(N)]  # logged every 10 iterations: violations name these numbers


def healthy(n=N, seed=0):
    """A run that a practitioner would call healthy: every metric in range, reward rising through noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / n
    return {
        "step": np.array(STEPS[:n], float),
        "objective/kl": 1.0 + 4.0 * t + rng.uniform(-0.3, 0.3, n),
        "policy/ratio_mean": 1.0 + rng.uniform(-0.02, 0.02, n),
        "policy/clipfrac": rng.uniform(0.12, 0.28, n),
        "value/explained_variance": 0.2 + 0.6 * t,
        "objective/scores": 2.0 * t + rng.uniform(-0.05, 0.05, n),
        "objective/entropy": 2.0 - 0.5 * t,
        "response/length_mean": 20.0 + 10.0 * t,
    }


def rows_of(history):
    return [{k: float(v[i]) for k, v in history.items()} for i in range(len(history["step"]))]


def test_healthy_history_is_quiet():
    for seed in range(5):
        report = check_health(rows_of(healthy(seed=seed)))
        assert report.violations == (), [v.message for v in report.violations]
        assert report.ok and report.line() == "ok" and report.spans() == []
        assert set(report.checked) == set(CHECKS) | {"non_finite"} and report.unchecked == ()
        assert report.last_iteration == STEPS[-1]


def single(report):
    assert len(report.violations) == 1, [v.message for v in report.violations]
    return report.violations[0]


# (check, metric, from index, new values, worst value)
CASES = [
    ("kl", "objective/kl", 20, lambda n: np.linspace(11.0, 25.0, n), 25.0),
    ("ratio", "policy/ratio_mean", 12, lambda n: np.full(n, 0.8), 0.8),
    ("clipfrac_high", "policy/clipfrac", 25, lambda n: np.linspace(0.35, 0.5, n), 0.5),
    ("clipfrac_low", "policy/clipfrac", 3, lambda n: np.linspace(0.05, 0.01, n), 0.01),
    ("explained_variance", "value/explained_variance", 8, lambda n: np.linspace(-0.5, 0.0, n), -0.5),
    ("entropy_collapse", "objective/entropy", 22, lambda n: np.linspace(0.5, 0.05, n), 0.05),  # start 2.0
    ("length_drift", "response/length_mean", 18, lambda n: np.linspace(41.0, 80.0, n), 80.0),  # start 20
    ("length_drift", "response/length_mean", 10, lambda n: np.linspace(9.9, 3.0, n), 3.0),
]


@pytest.mark.parametrize("check, metric, start, values, worst", CASES)
def test_each_check_fires_where_it_began(check, metric, start, values, worst):
    history = healthy()
    history[metric] = history[metric].copy()
    history[metric][start:] = values(N - start)
    v = single(check_health(rows_of(history)))
    assert (v.check, v.metric, v.began, v.ended, v.ongoing) == (check, metric, STEPS[start], STEPS[-1], True)
    assert v.worst == pytest.approx(worst)
    assert v.severity == CHECKS[check][2]
    assert f"from iteration {STEPS[start]} to {STEPS[-1]}" in v.message


def test_a_violation_that_ended_is_not_ongoing():
    history = healthy()
    history["objective/kl"][5:9] = 12.0
    report = check_health(rows_of(history))
    v = single(report)
    assert (v.began, v.ended, v.ongoing) == (STEPS[5], STEPS[8], False)
    assert report.ok and report.line() == "ok (1 earlier)"
    assert report.spans() == [(STEPS[5], STEPS[8], "kl", "critical", "objective/kl")]


def test_kl_limit_is_configurable():
    history = healthy()  # KL reaches ~5
    assert single(check_health(rows_of(history), HealthLimits(max_kl=4.0))).check == "kl"


def test_reward_falling_needs_the_whole_window():
    history = healthy()
    reward = history["objective/scores"] = np.linspace(0.0, 1.4, N)
    limits = HealthLimits(reward_smoothing=0.0, reward_window=5)
    reward[14:19] = [1.3, 1.2, 1.1, 1.0, 0.9]  # four falls, then a rise (0.917): not yet a violation
    assert check_health(rows_of(history), limits).violations == ()
    reward[14:20] = [1.3, 1.2, 1.1, 1.0, 0.9, 0.8]  # five falls in a row, from the peak at index 14
    v = single(check_health(rows_of(history), limits))
    assert (v.check, v.began, v.ended, v.ongoing, v.worst) == ("reward_falling", STEPS[15], STEPS[19], False, 0.8)


def test_reward_crash_through_noise_is_caught_with_default_smoothing():
    history = healthy()
    rng = np.random.default_rng(1)
    history["objective/scores"][20:] = -1.0 + rng.uniform(-0.05, 0.05, N - 20)  # collapse, never recovers
    v = single(check_health(rows_of(history)))
    assert v.check == "reward_falling" and v.began == STEPS[20]


def test_ema_and_falling_runs_match_hand_loops():
    x = np.array([1.0, 3.0, 2.0, 2.5, 0.0, -1.0, -1.5, -1.6, 4.0])
    s, expected = None, []
    for v in x:
        s = v if s is None else 0.6 * s + 0.4 * v
        expected.append(s)
    np.testing.assert_allclose(ema(x, 0.6), expected)
    np.testing.assert_array_equal(falling_runs(x, 3), [0, 0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(falling_runs(x, 5), np.zeros(9, bool))


def test_non_finite_metrics_are_a_violation_not_a_pass():
    history = healthy()
    history["objective/kl"][7] = np.nan
    history["policy/ratio_mean"][7:9] = np.inf
    v = single(check_health(rows_of(history)))
    assert (v.check, v.began, v.ended, v.severity) == ("non_finite", STEPS[7], STEPS[8], "critical")
    assert v.metric == "objective/kl, policy/ratio_mean"
    report_json = json.loads(json.dumps(check_health(rows_of(history)).to_json()))
    assert report_json["violations"][0]["worst"] == "nan"


def test_several_violations_in_order_and_progress_line():
    history = healthy()
    history["objective/kl"][20:] = 15.0
    history["policy/clipfrac"][10:] = 0.45
    history["value/explained_variance"][3:6] = -0.1
    report = check_health(rows_of(history))
    assert [(v.check, v.began) for v in report.violations] == [
        ("explained_variance", STEPS[3]),
        ("clipfrac_high", STEPS[10]),
        ("kl", STEPS[20]),
    ]
    assert not report.ok
    # Critical first; each with the iteration where it began.
    assert report.line() == f"KL high since {STEPS[20]}; clipfrac high since {STEPS[10]}"
    assert report.line(max_items=1) == f"KL high since {STEPS[20]}; +1 more"
    out = json.loads(json.dumps(report.to_json()))
    assert out["ok"] is False and out["ongoing"] == ["clipfrac_high", "kl"]
    assert out["violations"][2] == {
        "check": "kl",
        "metric": "objective/kl",
        "severity": "critical",
        "began": STEPS[20],
        "ended": STEPS[-1],
        "ongoing": True,
        "worst": 15.0,
        "message": report.violations[2].message,
    }
    assert out["limits"]["max_kl"] == 10.0


def test_history_forms_and_missing_metrics():
    history = healthy()
    history["objective/kl"][20:] = 15.0
    as_rows = check_health(rows_of(history))
    as_arrays = check_health(history)
    assert as_rows.violations == as_arrays.violations
    # Only some metrics, short names, no step column (iterations are row indices), a key logged on some rows.
    rows = [{"kl": 1.0 + 2 * i, "entropy": 1.0} for i in range(6)]
    for row in rows[::2]:
        row["clipfrac"] = 0.2
    rows[3].pop("entropy")
    report = check_health(rows)
    assert report.checked == {"kl": "kl", "clipfrac_high": "clipfrac", "clipfrac_low": "clipfrac",
                              "entropy_collapse": "entropy", "non_finite": "kl, clipfrac, entropy"}  # fmt: skip
    assert set(report.unchecked) == {"ratio", "explained_variance", "reward_falling", "length_drift"}
    v = single(report)
    assert (v.check, v.began, v.ended, v.worst) == ("kl", 5, 5, 11.0)
    empty = check_health([])
    assert empty.ok and empty.last_iteration is None and "non_finite" in empty.unchecked


def test_bad_input_names_the_row_and_key():
    with pytest.raises(ValueError, match=r"row 1 key 'objective/kl' is 'high'"):
        check_health([{"objective/kl": 1.0}, {"objective/kl": "high"}])
    with pytest.raises(ValueError, match="differ in length"):
        check_health({"kl": [1.0, 2.0], "entropy": [1.0]})
    with pytest.raises(ValueError, match="clipfrac_low <= clipfrac_high"):
        HealthLimits(clipfrac_low=0.5, clipfrac_high=0.3)
    assert math.isfinite(HealthLimits().max_kl)


class RecordingAxes:
    def __init__(self):
        self.spans, self.lines = [], []

    def axvspan(self, x0, x1, **kw):
        self.spans.append((x0, x1, kw["color"]))

    def axvline(self, x, **kw):
        self.lines.append(x)

    def annotate(self, *args, **kw):
        pass


def test_curves_shade_each_span_on_its_metric_panel(tmp_path):
    from ppojax.reports import MetricsWriter

    writer = MetricsWriter(str(tmp_path), "ppo", progress=False, plot_every=1000)
    history = healthy()
    history["objective/kl"][20:] = 15.0
    history["objective/kl"][3] = np.nan
    report = check_health(rows_of(history))
    writer.spans, writer.marks = report.spans(), [(0.5, "warm-up"), (10.5, "main")]
    kl_panel, entropy_panel = RecordingAxes(), RecordingAxes()
    writer._draw_spans_and_marks(kl_panel, ["objective/kl"], label=True)
    writer._draw_spans_and_marks(entropy_panel, ["objective/entropy"], label=False)
    assert kl_panel.spans == [
        (STEPS[3] - 0.5, STEPS[3] + 0.5, "tab:red"),
        (STEPS[20] - 0.5, STEPS[-1] + 0.5, "tab:red"),
    ]
    assert entropy_panel.spans == [] and entropy_panel.lines == kl_panel.lines == [0.5, 10.5]
    for i, row in enumerate(rows_of(history)[:3]):
        writer.log(STEPS[i], row)
    assert writer.plot() and os.path.getsize(writer.plot_path) > 1000


def test_health_watch_says_each_violation_once(tmp_path):
    from ppojax.reports import MetricsWriter
    from ppojax.runner_ppo import HealthWatch

    writer = MetricsWriter(str(tmp_path), "ppo", progress=False, plot_every=1000)
    said = []
    writer.say = said.append
    watch = HealthWatch(writer)
    history = rows_of(healthy())
    for row in history[:15]:
        row = dict(row, **{"objective/kl": 12.0 if row["step"] >= 100 else row["objective/kl"]})
        step = int(row.pop("step"))
        watch.update(step, row)
        writer.log(step, row)
    began = check_health(writer.rows[:10]).violations[0]  # the report as it stood at step 100
    assert began.message.startswith("KL to the reference above 10") and (began.began, began.ended) == (100, 100)
    assert said == ["ppojax ppo step 100: health critical: " + began.message]
    assert writer.note == "KL high since 100" and writer.read_events() == []
