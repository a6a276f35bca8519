"""`ppojax review`: scripted ratings in-process, the agreement report against scipy, and the real command in a
pseudo-terminal: it saves every rating, survives Ctrl-C (SIGINT from the terminal) and resumes where it stopped."""

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats

from ppojax.review import ReviewError, agreement_report, load_ratings, ratings_path_for, review

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLES = [
    {"step": 10, "prompt": "say hi", "response": "hi there", "score": 0.2},
    {"step": 10, "prompt": "write a poem", "response": "roses are red", "score": 0.5},
    {"step": 20, "prompt": "1+1=?", "response": "Let me explain in great detail ... " * 5 + "2", "score": 2.5},
    {"step": 20, "prompt": "thanks", "response": "you are welcome", "score": 0.9},
    {"step": 30, "prompt": "name a colour", "response": "blue", "score": 1.1},
]


@pytest.fixture
def samples_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return str(path)


def read_ratings(samples_file):
    with open(ratings_path_for(samples_file)) as f:
        return [json.loads(line) for line in f]


def test_scripted_session_saves_reports_and_resumes(samples_file):
    out = io.StringIO()
    # 3 → sample 0; "x" is refused and asked again; 4 → sample 1; s skips sample 2; q quits before sample 3.
    result = review(samples_file, stdin=io.StringIO("3\nx\n4\ns\nq\n"), stdout=out)
    text = out.getvalue()
    assert "'x' is not a rating" in text and "[1/5] sample #1, step 10, reward-model score 0.2" in text
    assert result["stopped"] == "quit" and (result["rated"], result["skipped"]) == (2, 1)
    rows = read_ratings(samples_file)
    assert [(r["index"], r.get("rating"), r.get("skipped")) for r in rows] == [
        (0, 3, None),
        (1, 4, None),
        (2, None, True),
    ]
    assert rows[0]["prompt"] == "say hi" and rows[1]["score"] == 0.5

    out = io.StringIO()
    result = review(samples_file, stdin=io.StringIO("1\n5\n"), stdout=out, high_score=2.0)
    text = out.getvalue()
    assert "resuming: 3 of 5 samples already reviewed" in text and "[4/5] sample #4" in text
    assert "sample #1," not in text  # nothing shown twice
    assert result["stopped"] is None and result["rated"] == 4
    ratings = {r["index"]: r["rating"] for r in read_ratings(samples_file) if "rating" in r}
    assert ratings == {0: 3, 1: 4, 3: 1, 4: 5}
    scores = [SAMPLES[i]["score"] for i in sorted(ratings)]
    want = scipy.stats.spearmanr(scores, [ratings[i] for i in sorted(ratings)]).statistic
    assert result["spearman"] == pytest.approx(want, abs=1e-12)
    assert f"Spearman {want:+.3f}" in text
    # Nothing left: a third run only reports.
    assert review(samples_file, stdin=io.StringIO(""), stdout=io.StringIO())["rated"] == 4


def test_reward_hacking_flags_high_score_low_rating(samples_file):
    samples = [dict(s) for s in SAMPLES]
    ratings = {i: {"rating": r} for i, r in enumerate([4, 4, 1, 2, 5])}
    report = agreement_report(samples, ratings)
    # Default "high": the 75th percentile of the file's scores (numpy's linear interpolation) = 1.1.
    assert report["high_score"] == pytest.approx(np.percentile([s["score"] for s in SAMPLES], 75))
    assert [(h["index"], h["rating"]) for h in report["likely_reward_hacking"]] == [(2, 1)]
    report = agreement_report(samples, ratings, high_score=0.8)
    assert [h["index"] for h in report["likely_reward_hacking"]] == [2, 3]  # highest score first
    scores, rates = [s["score"] for s in SAMPLES], [4, 4, 1, 2, 5]
    assert report["pearson"] == pytest.approx(scipy.stats.pearsonr(scores, rates).statistic, abs=1e-12)
    assert agreement_report(samples, {0: {"rating": 3}, 1: {"rating": 2}})["spearman"] is None  # too few


def test_stale_or_bad_ratings_file_is_an_error(samples_file):
    review(samples_file, stdin=io.StringIO("3\nq\n"), stdout=io.StringIO())
    changed = [dict(s) for s in SAMPLES]
    changed[0]["response"] = "something else"
    with pytest.raises(ReviewError, match="sample 0 does not match the samples file"):
        load_ratings(ratings_path_for(samples_file), changed)
    with open(samples_file, "a") as f:
        f.write('{"prompt": "p", "response": 3}\n')
    with pytest.raises(ReviewError, match="field 'response' must be a string"):
        review(samples_file, stdin=io.StringIO(""), stdout=io.StringIO())


class Terminal:
    """The command in a pseudo-terminal that is its controlling tty (so Ctrl-C there is a real SIGINT).

    Started with util-linux `setsid --ctty` through subprocess (fork + exec in C): `pty.fork()` would fork this
    multi-threaded (JAX) process in Python, which JAX warns may deadlock."""

    def __init__(self, *args, sigint_ignored: bool = False):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        self.fd, slave = os.openpty()
        command = [sys.executable, "-m", "ppojax.cli", *args]
        if sigint_ignored:  # as a command started in the background of a shell without job control inherits it
            command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
        command = ["setsid", "--ctty", *command]
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.pid = self.process.pid
        self.seen = b""

    def expect(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.time() + timeout
        while text.encode() not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; saw {self.seen.decode(errors='replace')!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"ended before {text!r}; saw {self.seen.decode(errors='replace')!r}")
            self.seen += chunk
        head, _, self.seen = self.seen.partition(text.encode())
        return head.decode(errors="replace")

    def send(self, data: str):
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 90.0) -> int:
        deadline = time.time() + timeout
        while True:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                self.process.kill()
                raise AssertionError(f"the command did not exit; saw {self.seen.decode(errors='replace')!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        code = self.process.wait(timeout=60)
        os.close(self.fd)
        return code if code >= 0 else 128 - code


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid to give the command a tty")
def test_terminal_session_survives_ctrl_c_and_resumes(samples_file):
    prompt = "rating 1-5, s = skip, q = quit: "
    term = Terminal("review", samples_file)
    term.expect(prompt)
    term.send("5\n")
    shown = term.expect(prompt)
    assert "sample #2" in shown
    term.send("\x03")  # Ctrl-C at the prompt: the terminal sends SIGINT
    assert term.wait() == 130
    assert "interrupted: 1 of 5 reviewed" in term.seen.decode(errors="replace")
    assert [(r["index"], r["rating"]) for r in read_ratings(samples_file)] == [(0, 5)]

    term = Terminal("review", samples_file)
    shown = term.expect(prompt)
    assert "resuming: 1 of 5" in shown and "[2/5] sample #2" in shown
    for rating in ("2", "1", "4"):
        term.send(rating + "\n")
        term.expect(prompt)
    os.kill(term.pid, signal.SIGINT)  # a SIGINT from outside the terminal too
    assert term.wait() == 130
    assert [(r["index"], r["rating"]) for r in read_ratings(samples_file)] == [(0, 5), (1, 2), (2, 1), (3, 4)]
    # Sample #3 (score 2.5, the top) rated 1: flagged.
    assert "LIKELY REWARD HACKING: 1 sample(s)" in term.seen.decode(errors="replace")


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux setsid to give the command a tty")
def test_ctrl_c_stops_a_session_started_with_sigint_ignored(samples_file):
    """A command started in the background of a shell without job control inherits SIGINT ignored, and Python
    then installs no handler: Ctrl-C at the prompt did nothing (a test run started that way hung here)."""
    prompt = "rating 1-5, s = skip, q = quit: "
    term = Terminal("review", samples_file, sigint_ignored=True)
    term.expect(prompt)
    term.send("4\n")
    term.expect(prompt)
    term.send("\x03")
    assert term.wait() == 130
    assert "interrupted: 1 of 5 reviewed" in term.seen.decode(errors="replace")
    assert [(r["index"], r["rating"]) for r in read_ratings(samples_file)] == [(0, 4)]
