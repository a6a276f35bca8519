"""Reward-model quality checks behind `ppojax eval-rm --model DIR --data FILE|NAMES`.

A reward model that ranks held-out pairs well can still mislead PPO: its scores may track response length
more than quality, or drift away from what people prefer. This module measures, on a held-out file:

  accuracy            fraction of pairs with score(chosen) > score(rejected) (ties count as wrong)
  gold correlation    Pearson and Spearman correlation of the scores with human / gold scores, when the file
                      has them; either below `threshold` (default 0.6, the playbook's rule) means the reward
                      model needs retraining
  length bias         Pearson and Spearman correlation of the score with the response length (tokens), and on
                      pairs of different lengths how often the model prefers the longer response versus how
                      often the labels do

The data file is JSON or JSONL in one of two forms (see ppojax/data.py for the prompt formats):
  pairs:      {prompt..., "chosen", "rejected", "chosen_score"?, "rejected_score"?}   (also score_chosen /
              score_rejected, UltraFeedback's names)
  responses:  {prompt..., "response" | "output", "human_score" | "gold_score" | "rating"}   (e.g. the ratings
              that `ppojax review` saves)
A gold score must be on every record or on none.

The statistics are plain numpy functions of score arrays, checked against scipy in the tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

PAIR_GOLD_KEYS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"))
RESPONSE_GOLD_KEYS = ("human_score", "gold_score", "rating")


# ----------------------------------------------------------------------------------------------------------
# Statistics (host-side numpy)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span (scipy's "average" method)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²); NaN when either side is constant or n < 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson: expected two 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    if denominator == 0.0:
        return math.nan
    return float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


def _number(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def score_statistics(
    scores: np.ndarray,
    lengths: np.ndarray,
    *,
    pairs: Optional[np.ndarray] = None,
    gold: Optional[np.ndarray] = None,
    threshold: float = 0.6,
    length_bias_threshold: float = 0.5,
) -> dict:
    """The eval-rm numbers from per-response arrays.

    Args:
      scores: [R] reward-model scores. lengths: [R] response lengths in tokens.
      pairs: optional [P, 2] indices into the responses, (chosen, rejected) per row.
      gold: optional [R] human / gold scores.
      threshold: a gold correlation (Pearson or Spearman) below it means the model needs retraining.
      length_bias_threshold: a score–length Spearman correlation at or above it is flagged as length bias.

    Returns a JSON-able dict (NaN correlations become None).
    """
    scores, lengths = np.asarray(scores, np.float64), np.asarray(lengths, np.float64)
    out: dict = {"responses": int(len(scores)), "score_mean": _number(float(np.mean(scores)))}
    out["score_std"] = _number(float(np.std(scores)))
    length_pearson, length_spearman = pearson(scores, lengths), spearman(scores, lengths)
    length = {"pearson": _number(length_pearson), "spearman": _number(length_spearman)}
    if pairs is not None and len(pairs):
        pairs = np.asarray(pairs, np.int64)
        chosen, rejected = scores[pairs[:, 0]], scores[pairs[:, 1]]
        out["pairs"] = int(len(pairs))
        out["accuracy"] = _number(float(np.mean(chosen > rejected)))
        out["mean_margin"] = _number(float(np.mean(chosen - rejected)))
        longer_chosen = lengths[pairs[:, 0]] > lengths[pairs[:, 1]]
        differ = lengths[pairs[:, 0]] != lengths[pairs[:, 1]]
        if differ.any():
            model_prefers_longer = np.where(longer_chosen, chosen > rejected, rejected > chosen)[differ]
            length["pairs_of_different_length"] = int(differ.sum())
            length["model_prefers_longer"] = _number(float(np.mean(model_prefers_longer)))
            length["labels_prefer_longer"] = _number(float(np.mean(longer_chosen[differ])))
            shorter_chosen = differ & ~longer_chosen
            if shorter_chosen.any():
                # The hard case for a length-biased model: the better response is the shorter one.
                length["accuracy_when_chosen_is_shorter"] = _number(float(np.mean((chosen > rejected)[shorter_chosen])))
    if gold is not None:
        gold = np.asarray(gold, np.float64)
        gold_pearson, gold_spearman = pearson(scores, gold), spearman(scores, gold)
        out["gold"] = {
            "pearson": _number(gold_pearson),
            "spearman": _number(gold_spearman),
            "threshold": threshold,
            "gold_length_spearman": _number(spearman(gold, lengths)),
        }
        # An undefined correlation (constant scores) is no evidence of quality either.
        weakest = min((c if math.isfinite(c) else -math.inf) for c in (gold_pearson, gold_spearman))
        out["needs_retraining"] = bool(weakest < threshold)
    length["bias"] = bool(math.isfinite(length_spearman) and length_spearman >= length_bias_threshold)
    length["threshold"] = length_bias_threshold
    out["length"] = length
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading the file and scoring with the model


def _gold_keys(record: dict) -> Optional[tuple]:
    for keys in PAIR_GOLD_KEYS:
        if all(k in record for k in keys):
            return keys
    for key in RESPONSE_GOLD_KEYS:
        if key in record:
            return (key,)
    return None


def read_gold(path: str, kind: str) -> Optional[np.ndarray]:
    """[R] gold scores in response order (pairs: chosen then rejected per record), or None when the file has
    none. A file with gold scores on some records only is an error naming the first record without."""
    from ppojax.data import DataError, read_records

    records = read_records(path)
    found = [(where, _gold_keys(r), r) for where, r in records]
    with_gold = [f for f in found if f[1] is not None]
    if not with_gold:
        return None
    if len(with_gold) != len(found):
        where = next(w for w, k, _ in found if k is None)
        names = ", ".join("/".join(k) for k in PAIR_GOLD_KEYS) if kind == "pairs" else ", ".join(RESPONSE_GOLD_KEYS)
        raise DataError(f"{where}: no gold score ({names}) while other records have one; give it on every record")
    out = []
    for where, keys, record in found:
        if kind == "pairs" and len(keys) != 2:
            raise DataError(f"{where}: a pair needs chosen_score and rejected_score, found only {keys[0]!r}")
        for key in keys:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where}: field {key!r} must be a finite number, found {value!r}")
            out.append(float(value))
    return np.asarray(out, np.float64)


def file_kind(path: str) -> str:
    """ "pairs" when the first record has chosen and rejected, else "responses"."""
    from ppojax.data import read_records

    _, first = read_records(path)[0]
    return "pairs" if "chosen" in first and "rejected" in first else "responses"


def _pad_all(prompts, responses, pad_id):
    """Left-padded prompts and right-padded responses, all to the dataset's widest (one compiled shape)."""
    from ppojax.data import pad_responses
    from ppojax.generation import bucket_length, pad_prompts

    prompt_width = bucket_length(max(len(p) for p in prompts), 64)
    response_width = bucket_length(max(len(r) for r in responses), 64)
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_id, bucket=prompt_width)
    response_ids, response_mask = pad_responses(responses, pad_id, bucket=response_width)
    return prompt_ids, prompt_mask, response_ids, response_mask


def score_responses(model, params, prompts, responses, *, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """[R] float32 reward scores of (prompt ids, response ids) pairs, `batch_size` rows per forward pass.
    The last batch is filled with copies of the first row so every pass has one shape."""
    import jax

    from ppojax.generation import sequence_reward

    arrays = _pad_all(prompts, responses, pad_id)
    total = len(prompts)
    batch_size = max(1, min(batch_size, total))
    fill = (-total) % batch_size
    if fill:
        arrays = tuple(np.concatenate([a, np.repeat(a[:1], fill, axis=0)]) for a in arrays)
    scorer = jax.jit(functools.partial(sequence_reward, model))
    out = []
    for start in range(0, total + fill, batch_size):
        out.append(np.asarray(scorer(params, *(a[start : start + batch_size] for a in arrays))))
    return np.concatenate(out)[:total]


@contextlib.contextmanager
def _as_file(data: str, dataset_dir: Optional[str]):
    """A file for `data`: the file itself, or LLaMA-Factory dataset names (a comma list in `dataset_dir`'s
    dataset_info.json, as `dataset:` takes them) written as ppojax records to a temporary JSONL. Those formats have
    no gold scores, so named data gives accuracy (ranking datasets) and length bias."""
    if os.path.isfile(data):
        yield data
        return
    from ppojax import dataset_info
    from ppojax.data import read_dataset

    entries = dataset_info.resolve(data, dataset_dir, "--data")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for _, record in read_dataset(entries))
        yield path


@contextlib.contextmanager
def _without_skipped(path: str):
    """The path of the data without the samples `ppojax review` marked "skipped" (a temporary copy when
    there are any), so a ratings file can be evaluated as it is."""
    from ppojax.data import read_records

    records = read_records(path)
    if not any(r.get("skipped") for _, r in records):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        kept = os.path.join(tmp, os.path.basename(path))
        with open(kept, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for _, r in records if not r.get("skipped"))
        yield kept


def evaluate_reward_model(
    model_dir: str,
    data_path: str,
    *,
    template: str = "default",
    default_system: str | None = None,
    enable_thinking: bool | None = None,
    cutoff_len: int = 2048,
    batch_size: int = 8,
    threshold: float = 0.6,
    length_bias_threshold: float = 0.5,
    bf16: bool = False,
    base: str | None = None,
    dataset_dir: str | None = None,
) -> dict:
    """Loads the reward model (a `stage: rm` output_dir, any *ForSequenceClassification directory with one
    label, or a LLaMA-Factory rm output_dir: a LoRA one is applied to `base`), scores every response of
    `data_path` (a file, or LLaMA-Factory dataset names looked up in `dataset_dir`'s dataset_info.json) and
    returns `score_statistics` plus the file names. template, default_system, enable_thinking: render the prompts
    as in training (`ppojax.data`)."""
    import jax.numpy as jnp

    from ppojax import data as data_lib
    from ppojax.models import load_reward_model
    from ppojax.runner import fit_vocabulary

    with _as_file(data_path, dataset_dir) as data_file, _without_skipped(data_file) as path:
        kind = file_kind(path)
        gold = read_gold(path, kind)
        tokenizer, _ = data_lib.ensure_pad_token(data_lib.load_tokenizer(model_dir))
        loader = data_lib.load_preferences if kind == "pairs" else data_lib.load_sft
        dataset = loader(
            path,
            tokenizer,
            template=template,
            cutoff_len=cutoff_len,
            default_system=default_system,
            enable_thinking=enable_thinking,
        )
    prompts, responses, pairs = [], [], []
    for prompt, answers in zip(dataset.prompts, dataset.responses):
        start = len(responses)
        for answer in answers:
            prompts.append(prompt)
            responses.append(answer)
        if kind == "pairs":
            pairs.append((start, start + 1))
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    model, params = load_reward_model(model_dir, head="reward", base=base, dtype=dtype)
    model, params = fit_vocabulary(model, params, tokenizer)
    scores = score_responses(model, params, prompts, responses, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    eos = tokenizer.eos_token_id
    lengths = np.array([len(r) - (1 if r and r[-1] == eos else 0) for r in responses], np.float64)
    result = score_statistics(
        scores,
        lengths,
        pairs=np.asarray(pairs, np.int64) if pairs else None,
        gold=gold,
        threshold=threshold,
        length_bias_threshold=length_bias_threshold,
    )
    return {"model": model_dir, "data": data_path, "kind": kind, "truncated_rows": dataset.truncated, **result}


def format_report(result: dict) -> str:
    """The eval-rm result as a few lines for the terminal."""

    def f(x, pct=False):
        if x is None:
            return "undefined"
        return f"{x:.1%}" if pct else f"{x:+.3f}"

    lines = [f"reward model {result['model']} on {result['data']} ({result['responses']} responses)"]
    if "accuracy" in result:
        lines.append(
            f"  accuracy {f(result['accuracy'], True)} on {result['pairs']} pairs; mean margin {f(result['mean_margin'])}"
        )
    gold = result.get("gold")
    if gold:
        verdict = (
            f"BELOW {gold['threshold']}: the reward model needs retraining"
            if result["needs_retraining"]
            else f"at or above {gold['threshold']}: ok"
        )
        lines.append(f"  gold correlation: Pearson {f(gold['pearson'])}, Spearman {f(gold['spearman'])} ({verdict})")
    else:
        lines.append("  gold correlation: no human / gold scores in the file")
    length = result["length"]
    text = f"  length: score vs length Pearson {f(length['pearson'])}, Spearman {f(length['spearman'])}"
    if "model_prefers_longer" in length:
        text += (
            f"; prefers the longer response in {f(length['model_prefers_longer'], True)} of "
            f"{length['pairs_of_different_length']} pairs (labels: {f(length['labels_prefer_longer'], True)})"
        )
    lines.append(text)
    if "accuracy_when_chosen_is_shorter" in length:
        lines.append(
            f"  accuracy when the chosen response is the shorter: {f(length['accuracy_when_chosen_is_shorter'], True)}"
        )
    if length["bias"]:
        lines.append(
            f"  LENGTH BIAS: score–length Spearman >= {length['threshold']}; consider a length-aware reward "
            "(length_reward) or length-balanced pairs (rm_max_length_diff)"
        )
    if result.get("truncated_rows"):
        lines.append(f"  note: {result['truncated_rows']} rows were cut to cutoff_len")
    return "\n".join(lines)
