"""Reports: CSV (union of columns), summary.json, training_curves.png, samples.jsonl; atomic; resume."""

import json
import os

import numpy as np
import pytest

from ppojax.reports import MetricsWriter, atomic_write, make_tensorboard_writer, read_metrics_csv


def test_ppo_reports_written_and_parseable(tmp_path):
    writer = MetricsWriter(str(tmp_path), "ppo", total=3, progress=True)
    writer.log(
        1,
        {
            "objective/scores": 0.1,
            "objective/kl": 0.0,
            "objective/kl_coef": 0.2,
            "loss/policy": np.float32(0.5),
            "text": "ignored",
        },
    )
    writer.log(
        2,
        {
            "objective/scores": 0.4,
            "objective/kl": 1.5,
            "value/explained_variance": 0.3,
            "response/length_mean": np.array(12.0),
        },
    )  # a new column mid-run
    writer.samples(2, ["hi", "the cat"], ["yes", "sat"], [0.5, np.float32(-1.0)])
    writer.samples(3, ["hi"], ["no"], [0.1])
    summary = writer.close("completed", config_hash="abc")
    d = tmp_path / "ppo_metrics"
    assert sorted(os.listdir(d)) == ["samples.jsonl", "summary.json", "training_curves.png", "training_metrics.csv"]
    rows = read_metrics_csv(str(d / "training_metrics.csv"))
    assert rows[0] == {
        "step": 1,
        "objective/scores": 0.1,
        "objective/kl": 0.0,
        "objective/kl_coef": 0.2,
        "loss/policy": 0.5,
    }
    assert rows[1]["value/explained_variance"] == 0.3 and "loss/policy" not in rows[1]
    loaded = json.loads((d / "summary.json").read_text())
    assert loaded == json.loads(json.dumps(summary))
    assert loaded["status"] == "completed" and loaded["last_step"] == 2 and loaded["config_hash"] == "abc"
    assert loaded["metrics"]["objective/scores"]["first"] == 0.1 and loaded["metrics"]["objective/kl"]["max"] == 1.5
    samples = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert samples[1] == {"step": 2, "prompt": "the cat", "response": "sat", "score": -1.0} and len(samples) == 3
    assert (d / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


@pytest.mark.parametrize("stage,metrics", [("rm", {"loss": 0.7, "accuracy": 0.5}), ("sft", {"loss": 2.0})])
def test_rm_and_sft_reports(tmp_path, stage, metrics):
    writer = MetricsWriter(str(tmp_path), stage, progress=False)
    for step in range(1, 4):
        writer.log(step, {k: v / step for k, v in metrics.items()})
    writer.close()
    d = tmp_path / f"{stage}_metrics"
    assert (d / "training_curves.png").stat().st_size > 1000
    assert [r["step"] for r in read_metrics_csv(str(d / "training_metrics.csv"))] == [1, 2, 3]
    assert json.loads((d / "summary.json").read_text())["metrics"]["loss"]["last"] == pytest.approx(metrics["loss"] / 3)


def test_resume_keeps_rows_up_to_the_step_and_fresh_run_clears(tmp_path):
    writer = MetricsWriter(str(tmp_path), "sft", progress=False)
    for step in range(1, 6):
        writer.log(step, {"loss": float(step)})
    writer.close()
    resumed = MetricsWriter(str(tmp_path), "sft", resume_step=3, progress=False)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    rows = read_metrics_csv(str(tmp_path / "sft_metrics" / "training_metrics.csv"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsWriter(str(tmp_path), "sft", progress=False)  # a fresh run does not inherit old files
    assert not os.path.exists(tmp_path / "sft_metrics" / "training_metrics.csv")


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "x" / "f.json"
    atomic_write(str(path), "old")
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path / "x") == ["f.json"]


def test_tensorboard_is_optional(tmp_path):
    writer = MetricsWriter(str(tmp_path), "sft", tensorboard=True, progress=False)
    assert writer.tensorboard_available == (make_tensorboard_writer(str(tmp_path / "probe")) is not None)
    writer.log(1, {"loss": 1.0})  # works with or without a writer library
    writer.close()


def _tfrecords(path):
    """The records of a TFRecord file (u64 length, u32 crc, data, u32 crc): how TensorBoard event files are laid out."""
    import struct

    with open(path, "rb") as f:
        blob = f.read()
    offset, records = 0, []
    while offset < len(blob):
        (length,) = struct.unpack("<Q", blob[offset : offset + 8])
        records.append(blob[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
    return records


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    """With tensorboardX installed (the test extra), `tensorboard: true` writes every logged metric per step."""
    from tensorboardX.proto import event_pb2  # in the test extra: this test must run, not skip

    writer = MetricsWriter(str(tmp_path), "ppo", tensorboard=True, progress=False)
    assert writer.tensorboard_available
    writer.log(1, {"objective/kl": 0.5, "loss/policy": -0.25})
    writer.log(2, {"objective/kl": 1.5, "loss/policy": 0.125})
    writer.close()
    directory = tmp_path / "ppo_metrics" / "tensorboard"
    found = {}
    for name in os.listdir(directory):
        for record in _tfrecords(directory / name):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found[(value.tag, event.step)] = value.simple_value
    assert found == {
        ("objective/kl", 1): 0.5,
        ("loss/policy", 1): -0.25,
        ("objective/kl", 2): 1.5,
        ("loss/policy", 2): 0.125,
    }


def test_rollback_truncates_rows_and_samples_and_keeps_events(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), "ppo", progress=False)
    for step in (1, 2, 3):
        writer.log(step, {"objective/kl": float(step)})
        writer.samples(step, [f"p{step}"], [f"r{step}"], [float(step)])
    writer.event(3, "iteration_rejected", reason="KL 3 > early_stop_kl 2")
    assert capsys.readouterr().err == "ppojax ppo step 3: iteration_rejected; reason KL 3 > early_stop_kl 2\n"
    writer.truncate(1)
    assert [r["step"] for r in read_metrics_csv(writer.csv_path)] == [1]
    samples = [json.loads(line) for line in open(writer.samples_path)]
    assert samples == [{"step": 1, "prompt": "p1", "response": "r1", "score": 1.0}]
    writer.log(2, {"objective/kl": 0.5})
    writer.samples(2, ["p2b"], ["r2b"], [0.5])
    summary = writer.close("completed", events=writer.read_events())
    assert summary["events"] == [{"step": 3, "event": "iteration_rejected", "reason": "KL 3 > early_stop_kl 2"}]
    # A resumed run (from step 1) drops the later samples and rows but keeps the events.
    resumed = MetricsWriter(str(tmp_path), "ppo", resume_step=1, progress=False)
    assert [json.loads(line)["step"] for line in open(resumed.samples_path)] == [1]
    assert [r["step"] for r in resumed.rows] == [1] and len(resumed.read_events()) == 1


def test_a_non_primary_process_keeps_everything_in_memory_and_writes_nothing(tmp_path, capsys):
    """Processes other than 0 of a multi-host run: the same rows, events and summary as process 0's writer, but
    no file (not even the directory), no bar, no printed line."""
    kwargs = dict(total=3, tensorboard=True, progress=True)
    primary = MetricsWriter(str(tmp_path / "p0"), "ppo", **kwargs)
    other = MetricsWriter(str(tmp_path / "p1"), "ppo", primary=False, **kwargs)
    capsys.readouterr()
    for writer in (primary, other):
        for step in (1, 2):
            writer.log(step, {"objective/kl": 0.1 * step, "objective/scores": float(step)})
            writer.samples(step, [f"p{step}"], [f"r{step}"], [float(step)])
        writer.event(2, "iteration_rejected", reason="KL")
        writer.truncate(1)
        writer.say("a line")
    printed = capsys.readouterr()
    printed = printed.out + printed.err
    assert printed.count("iteration_rejected") == printed.count("a line") == 1  # process 0's lines only
    summaries = [w.close("completed", events=w.read_events()) for w in (primary, other)]
    assert not (tmp_path / "p1").exists()
    assert other.rows == primary.rows and other.read_events() == primary.read_events()
    for summary in summaries:
        summary.pop("wall_time_s")
        summary["files"] = None
    assert summaries[0] == summaries[1] and summaries[0]["events"][0]["event"] == "iteration_rejected"
    # Resuming, a non-primary process reads what process 0 wrote (rows up to the step, every event).
    resumed = MetricsWriter(str(tmp_path / "p0"), "ppo", resume_step=1, primary=False, progress=False)
    assert resumed.rows == primary.rows and resumed.read_events() == primary.read_events()
