"""`ppojax eval-rm`: the statistics against scipy / numpy, and the command end to end on a tiny random Qwen2
reward model, its numbers recomputed from scores obtained by a separate forward pass."""

import json

import numpy as np
import pytest
import scipy.stats

from ppojax.cli import main
from ppojax.eval_rm import pearson, rankdata, score_statistics, spearman
from tests.tiny_models import save_tiny_model


def make_qwen2_tokenizer():
    """A tiny byte-level BPE tokenizer: next to a qwen2 config.json, AutoTokenizer reloads it as the Qwen2
    tokenizer class (a WordLevel one would lose its vocabulary there). No pad token: ppojax adds one."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = ["write a poem about the cat", "hi there good bad yes no and the cat sat"] * 4
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def test_rankdata_and_correlations_match_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 50):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        ties_x, ties_y = rng.integers(1, 4, size=n).astype(float), rng.integers(1, 6, size=n).astype(float)
        np.testing.assert_array_equal(rankdata(ties_x), scipy.stats.rankdata(ties_x))
        for a, b in ((x, y), (ties_x, y), (ties_x, ties_y)):
            if np.ptp(a) == 0 or np.ptp(b) == 0:
                continue
            assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b).statistic, abs=1e-12)
            assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
            assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and np.isnan(spearman([1.0], [2.0]))
    assert pearson([1, 2, 3], [2, 4, 6]) == 1.0 and spearman([1, 2, 3], [9, 4, 1]) == -1.0
    with pytest.raises(ValueError, match="shapes"):
        pearson([1.0, 2.0], [1.0])


def reference_statistics(scores, lengths, pairs, gold):
    """The same numbers written out with numpy / scipy and explicit loops."""
    chosen, rejected = scores[pairs[:, 0]], scores[pairs[:, 1]]
    prefers_longer, labels_longer, short_right = [], [], []
    for (c, r), sc, sr in zip(pairs, chosen, rejected):
        if lengths[c] == lengths[r]:
            continue
        longer_is_chosen = lengths[c] > lengths[r]
        prefers_longer.append((sc > sr) if longer_is_chosen else (sr > sc))
        labels_longer.append(longer_is_chosen)
        if not longer_is_chosen:
            short_right.append(sc > sr)
    return {
        "accuracy": np.mean(chosen > rejected),
        "mean_margin": np.mean(chosen - rejected),
        "gold_pearson": np.corrcoef(scores, gold)[0, 1],
        "gold_spearman": scipy.stats.spearmanr(scores, gold).statistic,
        "length_pearson": np.corrcoef(scores, lengths)[0, 1],
        "length_spearman": scipy.stats.spearmanr(scores, lengths).statistic,
        "model_prefers_longer": np.mean(prefers_longer),
        "labels_prefer_longer": np.mean(labels_longer),
        "accuracy_when_chosen_is_shorter": np.mean(short_right),
    }


def assert_matches_reference(result, ref, tol=1e-5):
    length, gold = result["length"], result["gold"]
    got = {
        "accuracy": result["accuracy"],
        "mean_margin": result["mean_margin"],
        "gold_pearson": gold["pearson"],
        "gold_spearman": gold["spearman"],
        "length_pearson": length["pearson"],
        "length_spearman": length["spearman"],
        "model_prefers_longer": length["model_prefers_longer"],
        "labels_prefer_longer": length["labels_prefer_longer"],
        "accuracy_when_chosen_is_shorter": length["accuracy_when_chosen_is_shorter"],
    }
    for key, want in ref.items():
        assert got[key] == pytest.approx(want, abs=tol), key


def test_score_statistics_match_numpy():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=40)
    lengths = rng.integers(1, 30, size=40).astype(float)
    gold = scores + rng.normal(size=40)
    pairs = rng.permutation(40).reshape(20, 2)
    result = score_statistics(scores, lengths, pairs=pairs, gold=gold, threshold=0.6)
    assert_matches_reference(result, reference_statistics(scores, lengths, pairs, gold))
    assert result["needs_retraining"] == (min(result["gold"]["pearson"], result["gold"]["spearman"]) < 0.6)
    # Scores equal to the gold scores: perfect agreement, no retraining; scores = length: length bias.
    assert score_statistics(gold, lengths, gold=gold)["needs_retraining"] is False
    assert score_statistics(lengths, lengths)["length"]["bias"] is True
    # Constant scores carry no information: undefined correlations, and retraining is needed.
    flat = score_statistics(np.zeros(40), lengths, gold=gold)
    assert flat["gold"]["pearson"] is None and flat["needs_retraining"] is True


ROWS = [
    {"prompt": "write a poem", "chosen": "the cat sat", "rejected": "no", "chosen_score": 4.5, "rejected_score": 2},
    {"prompt": "hi there", "chosen": "good", "rejected": "bad bad bad", "chosen_score": 3, "rejected_score": 1},
    {"prompt": "the cat", "chosen": "sat and sat", "rejected": "no no", "chosen_score": 5, "rejected_score": 2.5},
    {"prompt": "hi", "chosen": "hi there", "rejected": "yes", "chosen_score": 2, "rejected_score": 3},
    {"prompt": "a poem", "chosen": "yes", "rejected": "the cat", "chosen_score": 4, "rejected_score": 1},
]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny random Qwen2 reward model (one-label ForSequenceClassification) whose tokenizer has no pad."""
    root = tmp_path_factory.mktemp("rm")
    tokenizer = make_qwen2_tokenizer()
    model, params = save_tiny_model(root / "rm", tokenizer, head="reward", seed=1, model_type="qwen2")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, model, params, tokenizer


def reference_scores(model, params, tokenizer):
    """Scores from one forward pass over prompt + response written contiguously and right-padded, read at the
    last real token: no left padding, no batching by the tool."""
    sequences, lengths, gold = [], [], []
    for row in ROWS:
        prompt = tokenizer(row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            response = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            sequences.append(prompt + response + [tokenizer.eos_token_id])
            lengths.append(len(response))
            gold.append(row[f"{key}_score"])
    width = max(map(len, sequences))
    ids = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    scores = np.asarray(model.apply(params, ids, mask).scores)
    last = mask.sum(1) - 1
    return scores[np.arange(len(sequences)), last], np.array(lengths, float), np.array(gold, float)


def test_eval_rm_command_end_to_end(reward_dir, capsys):
    root, model, params, tokenizer = reward_dir
    out = root / "eval.json"
    code = main(
        ["eval-rm", "--model", str(root / "rm"), "--data", str(root / "pairs.jsonl"), "--batch-size", "4"]
        + ["--json", str(out), "--threshold", "0.6"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    scores, lengths, gold = reference_scores(model, params, tokenizer)
    pairs = np.arange(2 * len(ROWS)).reshape(-1, 2)
    assert result["kind"] == "pairs" and result["pairs"] == len(ROWS) and result["responses"] == 2 * len(ROWS)
    assert_matches_reference(result, reference_statistics(scores, lengths, pairs, gold), tol=2e-5)
    weakest = min(result["gold"]["pearson"], result["gold"]["spearman"])
    assert result["needs_retraining"] == (weakest < 0.6)
    assert f"accuracy {result['accuracy']:.1%} on {len(ROWS)} pairs" in printed
    assert ("needs retraining" in printed) == result["needs_retraining"]


def test_eval_rm_bad_input_is_one_line(reward_dir, capsys):
    root = reward_dir[0]
    assert main(["eval-rm", "--model", str(root / "missing"), "--data", str(root / "pairs.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing: no such directory")
    partial = root / "partial.jsonl"
    partial.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["eval-rm", "--model", str(root / "rm"), "--data", str(partial)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{partial}:2: no gold score" in err


def test_eval_rm_reads_llamafactory_dataset_names(reward_dir, tmp_path, monkeypatch, capsys):
    """`--data NAME --dataset-dir DIR`: the pairs registered as a LLaMA-Factory ranking dataset (alpaca columns)
    give the numbers of the same pairs written as a ppojax file (no gold scores in either)."""
    root = reward_dir[0]
    monkeypatch.chdir(tmp_path)
    plain = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    lf = tmp_path / "lf"
    lf.mkdir()
    lf_rows = [
        {"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS
    ]
    (lf / "held_out.json").write_text(json.dumps(lf_rows))
    (lf / "dataset_info.json").write_text(json.dumps({"held_out": {"file_name": "held_out.json", "ranking": True}}))
    common = ["eval-rm", "--model", str(root / "rm"), "--batch-size", "4"]
    assert main([*common, "--data", "plain.jsonl", "--json", "plain.json"]) == 0
    assert main([*common, "--data", "held_out", "--dataset-dir", "lf", "--json", "named.json"]) == 0
    by_file, by_name = (
        json.loads((tmp_path / "plain.json").read_text()),
        json.loads((tmp_path / "named.json").read_text()),
    )
    assert by_name["kind"] == "pairs" and by_name["pairs"] == len(ROWS) and by_name["data"] == "held_out"
    assert {k: v for k, v in by_name.items() if k != "data"} == {k: v for k, v in by_file.items() if k != "data"}
    capsys.readouterr()
    assert main([*common, "--data", "unknown", "--dataset-dir", "lf"]) == 2
    assert "no dataset named 'unknown' (it describes: held_out)" in capsys.readouterr().err
    assert main([*common, "--data", "unknown"]) == 2  # no data/dataset_info.json here
    assert "--data unknown: no such file (nor a dataset_info.json to look it up in)" in capsys.readouterr().err
