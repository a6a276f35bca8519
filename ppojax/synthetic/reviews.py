"""A small language of movie reviews with a gold reward computed by code.

Grammar (one word per token; the end of a review is the tokenizer's EOS):

    review := clause (CONNECTIVE clause)*            at most `MAX_CLAUSES` clauses
    clause := "the" NOUN VERB [NEGATION] [INTENSIFIER] ADJECTIVE

e.g. "the plot was not very clever but the music felt wonderful". A prompt is a review opening (a prefix that
stops inside the first clause or right after its connective); the response continues it.

Gold reward of a whole review (prompt + response), `gold_reward`:

    sentiment(clause) = polarity(ADJ) · (−1 if NEGATION) · (1.5 if INTENSIFIER)    polarity ∈ {+1, 0, −1}
    gold = mean over complete clauses of sentiment
           − ERROR_PENALTY · (words the grammar does not accept, + 1 for an unfinished last clause)
           − REPEAT_PENALTY · (adjectives used again in the same review)
           − MISSING_END_PENALTY · (no EOS) − EXTRA_CLAUSE_PENALTY · (clauses past MAX_CLAUSES)

so negation flips the next adjective and spamming a word, repeating a clause or rambling cannot raise it: the
mean does not grow with length. The parser is tolerant: a word that does not fit is counted and skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

ARTICLE = "the"
NOUNS = ("movie", "film", "plot", "acting", "story", "ending", "cast", "script", "music", "dialogue", "pacing", "humor")
VERBS = ("was", "is", "felt", "seemed", "looked")
NEGATIONS = ("not", "never")
INTENSIFIERS = ("very", "really", "truly", "quite", "so")
POSITIVE = ("good", "great", "brilliant", "wonderful", "moving", "funny", "clever", "beautiful", "charming", "superb")
NEGATIVE = ("bad", "boring", "dull", "awful", "terrible", "weak", "clumsy", "predictable", "bland", "painful")
NEUTRAL = ("long", "short", "loud", "quiet", "slow", "simple", "familiar", "unusual")
CONNECTIVES = ("and", "but", "although", "while", "because")
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
WORDS = (ARTICLE,) + NOUNS + VERBS + NEGATIONS + INTENSIFIERS + ADJECTIVES + CONNECTIVES
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}

MAX_CLAUSES = 3
INTENSITY = 1.5
ERROR_PENALTY = 1.0
REPEAT_PENALTY = 0.5
MISSING_END_PENALTY = 1.0
EXTRA_CLAUSE_PENALTY = 0.5

# Parser states: what the next word may be.
_START, _NOUN, _VERB, _AFTER_VERB, _AFTER_NEG, _AFTER_INT, _END_OF_CLAUSE = range(7)


class Parse(NamedTuple):
    """What the gold reward is computed from."""

    sentiments: tuple[float, ...]  # one per complete clause
    errors: int  # rejected words + 1 if the last clause is unfinished
    repeats: int  # adjectives used again
    clauses: int


def _accepts(state: int, word: str) -> int | None:
    """The next state after `word`, or None when the grammar does not accept it here."""
    if state == _START:
        return _NOUN if word == ARTICLE else None
    if state == _NOUN:
        return _VERB if word in NOUNS else None
    if state == _VERB:
        return _AFTER_VERB if word in VERBS else None
    if state == _AFTER_VERB and word in NEGATIONS:
        return _AFTER_NEG
    if state in (_AFTER_VERB, _AFTER_NEG) and word in INTENSIFIERS:
        return _AFTER_INT
    if state in (_AFTER_VERB, _AFTER_NEG, _AFTER_INT) and word in ADJECTIVES:
        return _END_OF_CLAUSE
    if state == _END_OF_CLAUSE and word in CONNECTIVES:
        return _START
    return None


def parse(words: Sequence[str]) -> Parse:
    """Tolerant left-to-right parse of a review's words (EOS excluded)."""
    state, negated, intensified = _START, False, False
    sentiments, errors, seen, repeats = [], 0, set(), 0
    for word in words:
        next_state = _accepts(state, word)
        if next_state is None:
            errors += 1
            continue
        if next_state == _NOUN:
            negated, intensified = False, False
        negated |= next_state == _AFTER_NEG
        intensified |= next_state == _AFTER_INT
        if next_state == _END_OF_CLAUSE:
            value = POLARITY[word] * (-1.0 if negated else 1.0) * (INTENSITY if intensified else 1.0)
            sentiments.append(value)
            repeats += word in seen
            seen.add(word)
        state = next_state
    if state != _END_OF_CLAUSE:
        errors += 1  # an empty review or one that stops mid-clause or after a connective
    return Parse(tuple(sentiments), errors, repeats, len(sentiments))


def gold_reward(words: Sequence[str], ended: bool = True) -> float:
    """The gold reward of a whole review (prompt words + response words); `ended`: it stopped with EOS."""
    p = parse(words)
    sentiment = float(np.mean(p.sentiments)) if p.sentiments else 0.0
    return (
        sentiment
        - ERROR_PENALTY * p.errors
        - REPEAT_PENALTY * p.repeats
        - MISSING_END_PENALTY * (not ended)
        - EXTRA_CLAUSE_PENALTY * max(0, p.clauses - MAX_CLAUSES)
    )


def repetition_free(words: Sequence[str]) -> bool:
    return parse(words).repeats == 0


# ----------------------------------------------------------------------------------------------------------
# Generating reviews


@dataclasses.dataclass(frozen=True)
class ReviewSampler:
    """How the corpus is drawn. `mood_bias` in [0, 1]: probability that a clause's adjective follows the
    review's mood (positive or negative, a coin flip per review) rather than being drawn from all adjectives."""

    max_clauses: int = MAX_CLAUSES
    p_negation: float = 0.2
    p_intensifier: float = 0.3
    p_neutral: float = 0.2
    mood_bias: float = 0.6


def sample_clause(rng: np.random.Generator, sampler: ReviewSampler, mood: float, used: set) -> list[str]:
    words = [ARTICLE, str(rng.choice(NOUNS)), str(rng.choice(VERBS))]
    negated = rng.random() < sampler.p_negation
    if negated:
        words.append(str(rng.choice(NEGATIONS)))
    if rng.random() < sampler.p_intensifier:
        words.append(str(rng.choice(INTENSIFIERS)))
    if rng.random() < sampler.p_neutral:
        pool = NEUTRAL
    elif rng.random() < sampler.mood_bias:
        # the surface polarity that expresses the mood: negation flips it
        pool = POSITIVE if (mood > 0) != negated else NEGATIVE
    else:
        pool = POSITIVE + NEGATIVE
    choices = [w for w in pool if w not in used] or list(pool)
    adjective = str(rng.choice(choices))
    used.add(adjective)
    return words + [adjective]


def sample_review(rng: np.random.Generator, sampler: ReviewSampler = ReviewSampler()) -> list[str]:
    """One grammatical review of 1..max_clauses clauses, no adjective repeated."""
    mood = 1.0 if rng.random() < 0.5 else -1.0
    used: set = set()
    words = sample_clause(rng, sampler, mood, used)
    for _ in range(int(rng.integers(0, sampler.max_clauses))):
        words += [str(rng.choice(CONNECTIVES))] + sample_clause(rng, sampler, mood, used)
    return words


def split_review(rng: np.random.Generator, words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(opening, continuation): the opening ends after the first clause's noun, verb, negation or intensifier,
    or after its connective when there is a second clause. Both parts are non-empty."""
    first_adjective = next(i for i, w in enumerate(words) if w in ADJECTIVES)
    cuts = list(range(2, first_adjective + 1))  # after the noun .. just before the adjective
    if len(words) > first_adjective + 1:
        cuts.append(first_adjective + 2)  # after the connective
    cut = int(rng.choice(cuts))
    return list(words[:cut]), list(words[cut:])


class Review(NamedTuple):
    """An opening and its continuation; `prompt + response` is the review's text (the response starts with a
    space)."""

    prompt: str
    response: str


def make_corpus(seed: int, size: int, sampler: ReviewSampler = ReviewSampler()) -> list[Review]:
    """`size` (opening, continuation) pairs, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(size):
        opening, rest = split_review(rng, sample_review(rng, sampler))
        out.append(Review(" ".join(opening), " " + " ".join(rest)))
    return out


def make_prompts(seed: int, size: int, sampler: ReviewSampler = ReviewSampler()) -> list[str]:
    """`size` review openings, deterministic in `seed` (use a seed distinct from the corpus's)."""
    return [r.prompt for r in make_corpus(seed, size, sampler)]


def review_gold(prompt: str, response: str, ended: bool = True) -> float:
    """Gold reward of a prompt and its response given as text."""
    return gold_reward(prompt.split() + response.split(), ended)


def gold_rewards(prompts: Iterable[str], responses: Iterable[str], ended: Iterable[bool]) -> np.ndarray:
    """[B] float32 gold rewards of text batches."""
    return np.asarray([review_gold(p, r, e) for p, r, e in zip(prompts, responses, ended)], np.float32)
