"""The synthetic review task: grammar and gold reward (hand-computed cases), deterministic generation, the
tokenizer, and the Bradley-Terry labels."""

import json

import numpy as np
import pytest

from ppojax.synthetic import reviews
from ppojax.synthetic.reviews import gold_reward, parse


def gold(text, ended=True):
    return gold_reward(text.split(), ended)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the movie was good", 1.0),
        ("the movie was bad", -1.0),
        ("the movie was long", 0.0),
        ("the movie was not good", -1.0),  # negation flips the next adjective
        ("the movie was never boring", 1.0),
        ("the movie was very good", 1.5),
        ("the movie was not very dull", 1.5),
        ("the movie was not long", 0.0),
        ("the plot was good but the music was not bad", 1.0),  # mean of +1 and +1
        ("the plot was great and the music felt awful", 0.0),
        ("the plot was very clever although the cast seemed weak", 0.25),  # (1.5 - 1) / 2
        # negation belongs to its own clause only
        ("the plot was not dull and the cast was good", 1.0),
    ],
)
def test_gold_reward_of_grammatical_reviews(text, expected):
    assert parse(text.split()).errors == 0
    assert gold(text) == pytest.approx(expected)


def test_degenerate_text_is_penalised():
    # every word rejected (5) + unfinished clause (1)
    assert gold("good good good good good") == pytest.approx(-6.0)
    # one clause then two stray adjectives: +1 - 2 errors
    assert gold("the movie was good good good") == pytest.approx(1.0 - 2.0)
    # "was" and "good" rejected, the clause never finishes: 3 errors
    assert gold("the was movie good") == pytest.approx(-3.0)
    # repeating a clause does not raise the mean and the repeated adjective costs 0.5 each
    assert gold("the movie was good and the movie was good and the movie was good") == pytest.approx(1.0 - 1.0)
    # more than MAX_CLAUSES clauses
    four = "the plot was good and the cast was great and the music was superb and the ending was moving"
    assert gold(four) == pytest.approx(1.0 - reviews.EXTRA_CLAUSE_PENALTY)
    # stopping after a connective, and not stopping at all
    assert gold("the movie was good and") == pytest.approx(1.0 - 1.0)
    assert gold("the movie was good", ended=False) == pytest.approx(1.0 - reviews.MISSING_END_PENALTY)
    assert gold("") == pytest.approx(-1.0)
    # the best one-clause review cannot be beaten by spamming positive words
    assert gold("the movie was very good great superb brilliant") < gold("the movie was very good")


def test_corpus_is_deterministic_grammatical_and_split_into_opening_and_continuation():
    a, b = reviews.make_corpus(7, 300), reviews.make_corpus(7, 300)
    assert a == b
    assert a != reviews.make_corpus(8, 300)
    for review in a:
        words = (review.prompt + review.response).split()
        p = parse(words)
        assert p.errors == 0 and p.repeats == 0 and 1 <= p.clauses <= reviews.MAX_CLAUSES
        assert review.prompt and review.prompt.split()[0] == "the"
        assert review.response.startswith(" ") and review.response.strip()
        assert (review.prompt + review.response).split() == review.prompt.split() + review.response.split()
    golds = np.array([reviews.review_gold(*r) for r in a])
    assert golds.std() > 0.5  # a mixture of moods: room for PPO to improve
    assert abs(golds.mean()) < 0.3
    assert reviews.make_prompts(3, 5) == reviews.make_prompts(3, 5)


def test_every_prompt_cut_is_a_prefix_the_grammar_accepts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        words = reviews.sample_review(rng)
        opening, rest = reviews.split_review(rng, words)
        assert opening + rest == words and opening and rest
        assert parse(opening).errors == 1  # only "unfinished": no rejected word
        assert not any(w in reviews.ADJECTIVES for w in opening[1:]) or opening[-1] in reviews.CONNECTIVES


@pytest.fixture(scope="module")
def tokenizer():
    from ppojax.synthetic.tokenizer import train_tokenizer

    corpus = reviews.make_corpus(0, 400)
    return train_tokenizer(r.prompt + r.response for r in corpus)


def test_tokenizer_round_trip_pad_eos_and_one_token_per_word(tokenizer):
    from ppojax.synthetic.tokenizer import EOS_TOKEN, PAD_TOKEN

    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for review in reviews.make_corpus(1, 50):
        text = review.prompt + review.response
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text.split())  # every word is one token
        response_ids = tokenizer(review.response, add_special_tokens=False)["input_ids"]
        assert ids[-len(response_ids) :] == response_ids  # a continuation tokenizes the same alone as in context
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": " good"}], tokenize=False
    )
    assert rendered == "the movie was good" + EOS_TOKEN


def test_tokenizer_reloads_next_to_a_qwen2_config(tokenizer, tmp_path):
    """transformers maps model_type qwen2 to its own Qwen2Tokenizer; the byte-level BPE survives that."""
    from ppojax.data import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": len(tokenizer)}))
    loaded = load_tokenizer(str(tmp_path))
    text = "the plot was not very dull but the music felt wonderful"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_bradley_terry_labels_follow_gold_and_the_length_bias():
    from ppojax.demo import label_pairs

    n = 40000
    rng = np.random.default_rng(0)
    gold_a, gold_b = rng.normal(size=n), rng.normal(size=n)
    len_a, len_b = rng.integers(3, 20, n), rng.integers(3, 20, n)
    for scale, bias in ((0.5, 0.0), (0.5, 0.3)):
        wins = label_pairs(np.random.default_rng(1), gold_a, gold_b, len_a, len_b, scale=scale, length_bias=bias)
        p = 1 / (1 + np.exp(-((gold_a - gold_b) / scale + bias * (len_a - len_b))))
        # calibration: in bins of the model probability the empirical win rate matches it
        bins = np.digitize(p, np.linspace(0, 1, 11)[1:-1])
        for k in range(10):
            sel = bins == k
            if sel.sum() > 500:
                assert abs(wins[sel].mean() - p[sel].mean()) < 4 * np.sqrt(0.25 / sel.sum()) + 1e-3
    unbiased = label_pairs(np.random.default_rng(1), gold_a, gold_b, len_a, len_b, scale=0.5)
    biased = label_pairs(np.random.default_rng(1), gold_a, gold_b, len_a, len_b, scale=0.5, length_bias=0.3)
    longer = len_a > len_b
    assert biased[longer].mean() > unbiased[longer].mean() + 0.1
