"""Random masked batches for property tests: right padding, holes, empty rows, length-1 rows."""

import os

import numpy as np
from hypothesis import strategies as st

# Every distinct shape costs fresh XLA compilations (jit) and op caches (no jit). The default run draws
# shapes from a small set, so those caches are reused; HYPOTHESIS_PROFILE=thorough draws any size.
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"

MASK_KINDS = ("right_padded", "holes", "with_empty_and_single_rows", "full")


def make_mask(rng: np.random.Generator, batch: int, width: int, kind: str) -> np.ndarray:
    if kind == "full":
        return np.ones((batch, width), np.float32)
    if kind == "holes":
        return (rng.random((batch, width)) < 0.6).astype(np.float32)
    lengths = rng.integers(0, width + 1, size=batch)
    if kind == "with_empty_and_single_rows":
        lengths[0] = 0
        if batch > 1:
            lengths[1] = 1
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)


@st.composite
def masked_batches(draw, max_batch=5, max_width=9, kinds=MASK_KINDS, fixed_shape=None):
    """(rng, batch, width, mask) with the mask drawn from one of `kinds`.

    `fixed_shape` pins (batch, width) in the default profile, for tests whose un-jitted variant would
    otherwise recompile every primitive per shape.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    if THOROUGH:
        batch, width = draw(st.integers(1, max_batch)), draw(st.integers(1, max_width))
    elif fixed_shape is not None:
        batch, width = fixed_shape
    else:
        batch = draw(st.sampled_from(sorted({1, 3, max_batch})))
        width = draw(st.sampled_from(sorted({1, 4, max_width})))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(seed)
    return rng, batch, width, make_mask(rng, batch, width, kind)


def poison(x: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Put NaN and ±inf at masked positions."""
    x = x.copy()
    bad = np.array([np.nan, np.inf, -np.inf], np.float32)
    idx = np.nonzero(mask == 0)
    x[idx] = bad[rng.integers(0, 3, size=len(idx[0]))]
    return x
