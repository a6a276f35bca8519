"""`ppojax review samples.jsonl`: rate a run's samples by hand and see whether the reward model agrees.

Reward goes up, but are the answers better? The playbook's answer is to read samples and rate them. This tool
shows each sample's prompt, response and reward-model score, takes a rating 1–5 (s: skip, q: quit), and
saves after every answer to `<samples>.ratings.jsonl` next to the file (written to a temporary file and
moved into place, so Ctrl-C or a crash never loses a rating nor leaves half a file). Running it again resumes
at the first sample not yet rated or skipped. At the end (or on quit) it reports:

  agreement     Spearman (and Pearson) correlation between the ratings and the reward-model scores
  reward hacks  samples the reward model scores high (>= `high_score`, default: the 75th percentile of the
                file's scores) that a person rated low (<= 2): the policy may be exploiting the reward model

The samples file is JSONL (or a JSON array) of {"prompt", "response", "score"?, "step"?} rows, as written
by `ppojax train` (stage ppo) to `<output_dir>/ppo_metrics/samples.jsonl`. The ratings file holds one row
per reviewed sample: {"index", "hash", "step", "prompt", "response", "score", "rating"} or, for a skipped
sample, "skipped": true instead of "rating". Rows are matched to samples by index and a hash of prompt +
response; a ratings file that no longer matches its samples is an error, not a silent mix-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
from typing import Optional, TextIO

import numpy as np

RATINGS = (1, 2, 3, 4, 5)
LOW_RATING = 2


class ReviewError(ValueError):
    """A bad samples or ratings file; one line naming the file."""


def ratings_path_for(samples_path: str) -> str:
    """samples.jsonl -> samples.ratings.jsonl (beside it)."""
    root, _ = os.path.splitext(samples_path)
    return root + ".ratings.jsonl"


def sample_hash(sample: dict) -> str:
    text = json.dumps([sample.get("prompt"), sample.get("response")], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_samples(path: str) -> list[dict]:
    """The samples, each checked for a string prompt and response and a numeric (or absent) score."""
    from ppojax.data import read_records

    samples = []
    for where, record in read_records(path):
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ReviewError(f"{where}: field '{key}' must be a string, found {record.get(key)!r}")
        score = record.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ReviewError(f"{where}: field 'score' must be a number, found {score!r}")
        samples.append(record)
    return samples


def load_ratings(path: str, samples: list[dict]) -> dict[int, dict]:
    """{sample index: ratings row} from an earlier session, checked against the samples."""
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index = int(row["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ReviewError(f"{path}:{number}: not a ratings row (expected JSON with an 'index')") from None
            if not 0 <= index < len(samples) or row.get("hash") != sample_hash(samples[index]):
                raise ReviewError(
                    f"{path}:{number}: sample {index} does not match the samples file (changed or reordered); "
                    "move the ratings file away to start over"
                )
            if not row.get("skipped") and row.get("rating") not in RATINGS:
                raise ReviewError(f"{path}:{number}: rating must be one of {RATINGS}, found {row.get('rating')!r}")
            out[index] = row
    return out


@contextlib.contextmanager
def _sigint_deferred():
    """Ctrl-C during a save is delivered after it, so the answer just given reaches the disk."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigint_raises():
    """Ctrl-C raises KeyboardInterrupt during the session even when SIGINT was ignored on entry: a command started
    in the background of a shell without job control (or by a runner that does so) inherits SIG_IGN for SIGINT,
    and Python then installs no handler, so Ctrl-C would do nothing at the rating prompt."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def save_ratings(path: str, ratings: dict[int, dict]) -> None:
    """Rewrites the ratings file atomically (temporary file + os.replace), Ctrl-C deferred until done."""
    from ppojax.reports import atomic_write

    text = "".join(json.dumps(ratings[i], ensure_ascii=False) + "\n" for i in sorted(ratings))
    with _sigint_deferred():
        atomic_write(path, text)


def ratings_row(index: int, sample: dict, rating: Optional[int]) -> dict:
    row = {
        "index": index,
        "hash": sample_hash(sample),
        "step": sample.get("step"),
        "prompt": sample["prompt"],
        "response": sample["response"],
        "score": sample.get("score"),
    }
    if rating is None:
        row["skipped"] = True
    else:
        row["rating"] = rating
    return row


# ----------------------------------------------------------------------------------------------------------
# The report (pure)


def agreement_report(samples: list[dict], ratings: dict[int, dict], *, high_score: Optional[float] = None) -> dict:
    """Agreement between ratings and reward-model scores, and the likely reward hacks. JSON-able."""
    from ppojax.eval_rm import pearson, spearman

    rated = sorted(i for i, row in ratings.items() if not row.get("skipped"))
    scored = [i for i in rated if _finite(samples[i].get("score"))]
    all_scores = np.array([s["score"] for s in samples if _finite(s.get("score"))], np.float64)
    if high_score is None and len(all_scores):
        high_score = float(np.percentile(all_scores, 75))
    report = {
        "samples": len(samples),
        "rated": len(rated),
        "skipped": sum(1 for row in ratings.values() if row.get("skipped")),
        "mean_rating": float(np.mean([ratings[i]["rating"] for i in rated])) if rated else None,
        "high_score": high_score,
        "spearman": None,
        "pearson": None,
    }
    if len(scored) >= 3:
        r = np.array([ratings[i]["rating"] for i in scored], np.float64)
        s = np.array([samples[i]["score"] for i in scored], np.float64)
        report["spearman"] = _or_none(spearman(s, r))
        report["pearson"] = _or_none(pearson(s, r))
    hacks = [
        {"index": i, "step": samples[i].get("step"), "score": samples[i]["score"], "rating": ratings[i]["rating"]}
        for i in scored
        if high_score is not None and samples[i]["score"] >= high_score and ratings[i]["rating"] <= LOW_RATING
    ]
    report["likely_reward_hacking"] = sorted(hacks, key=lambda h: -h["score"])
    return report


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def format_report(report: dict, samples: list[dict]) -> str:
    lines = [f"rated {report['rated']} of {report['samples']} samples ({report['skipped']} skipped)"]
    if report["mean_rating"] is not None:
        lines[0] += f", mean rating {report['mean_rating']:.2f}"
    if report["spearman"] is None:
        lines.append("agreement with the reward model: needs at least 3 rated samples with varied scores and ratings")
    else:
        lines.append(
            f"agreement with the reward model: Spearman {report['spearman']:+.3f}, Pearson "
            + ("undefined" if report["pearson"] is None else f"{report['pearson']:+.3f}")
        )
    hacks = report["likely_reward_hacking"]
    if hacks:
        lines.append(
            f"LIKELY REWARD HACKING: {len(hacks)} sample(s) scored >= {report['high_score']:.3g} by the reward model "
            f"but rated <= {LOW_RATING}:"
        )
        for h in hacks[:10]:
            text = " ".join(samples[h["index"]]["response"].split())
            excerpt = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"  #{h['index'] + 1} step {h['step']} score {h['score']:.3g} rating {h['rating']}: {excerpt}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The interactive loop


def _show(out: TextIO, position: int, total: int, index: int, sample: dict, max_chars: int) -> None:
    def cut(text: str) -> str:
        return text if len(text) <= max_chars else text[:max_chars] + f" [... {len(text) - max_chars} more chars]"

    score = sample.get("score")
    head = f"[{position}/{total}] sample #{index + 1}"
    if sample.get("step") is not None:
        head += f", step {sample['step']}"
    head += f", reward-model score {score:.4g}" if _finite(score) else ", no reward-model score"
    out.write(f"\n{'=' * 72}\n{head}\n--- prompt ---\n{cut(sample['prompt'])}\n--- response ---\n")
    out.write(f"{cut(sample['response'])}\n")


def review(
    samples_path: str,
    *,
    ratings_path: Optional[str] = None,
    high_score: Optional[float] = None,
    max_chars: int = 4000,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> dict:
    """Runs the rating loop over the samples not yet reviewed; returns the agreement report.

    Every answer is saved before the next sample is shown. Ctrl-C (KeyboardInterrupt) or end of input stop
    the loop: what was answered is already on disk; the report covers it.
    """
    samples = load_samples(samples_path)
    ratings_path = ratings_path or ratings_path_for(samples_path)
    ratings = load_ratings(ratings_path, samples)
    todo = [i for i in range(len(samples)) if i not in ratings]
    out = stdout
    if ratings:
        out.write(f"resuming: {len(ratings)} of {len(samples)} samples already reviewed ({ratings_path})\n")
    stopped = None
    try:
        with _sigint_raises():  # Ctrl-C stops the session even if SIGINT was ignored on entry
            for position, index in enumerate(todo, start=len(ratings) + 1):
                _show(out, position, len(samples), index, samples[index], max_chars)
                while True:
                    out.write("rating 1-5, s = skip, q = quit: ")
                    out.flush()
                    line = stdin.readline()
                    if not line:  # end of input
                        stopped = "end of input"
                        break
                    answer = line.strip().lower()
                    if answer in ("q", "quit"):
                        stopped = "quit"
                        break
                    if answer in ("s", "skip"):
                        rating = None
                    elif answer in {str(r) for r in RATINGS}:
                        rating = int(answer)
                    else:
                        out.write(f"  {answer!r} is not a rating; type 1, 2, 3, 4 or 5, s to skip, q to quit\n")
                        continue
                    ratings[index] = ratings_row(index, samples[index], rating)
                    save_ratings(ratings_path, ratings)
                    break
                if stopped:
                    break
    except KeyboardInterrupt:
        stopped = "interrupted"
    if stopped:
        out.write(
            f"\n{stopped}: {len(ratings)} of {len(samples)} reviewed, saved to {ratings_path}; run again to resume\n"
        )
    else:
        out.write(f"\nall {len(samples)} samples reviewed; ratings in {ratings_path}\n")
    report = agreement_report(samples, ratings, high_score=high_score)
    out.write(format_report(report, samples) + "\n")
    out.flush()
    return {**report, "stopped": stopped, "ratings_path": ratings_path}
