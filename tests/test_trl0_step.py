"""ppojax's `llamafactory` preset against TRL 0.9.6's `PPOTrainer.step()` (what LLaMA-Factory 0.9.x runs), end to end.

`experiments/parity/trl0_step.py` (its docstring has the method) ran TRL's `step` unmodified on a tiny Qwen2 with a
value head (bias included) on its trunk, LLaMA-Factory's micro-batches (2 rows, 2 accumulated per optimizer step,
2 epochs: 4 steps) and sampling temperature 0.95, and stored the workload and TRL's outputs in
`tests/data/trl0_step.npz`. Here ppojax recomputes everything from the stored workload: log-probs (TRL: at T = 1),
reference log-probs, values, shaped rewards, whitened advantages, returns, and the weights after the first and
the last optimizer step. Negative controls change one detail of the preset and must be told apart.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "parity"))
import trl0_step as S  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "trl0_step.npz")


@pytest.fixture(scope="module")
def data():
    return dict(np.load(DATA))


def _check(errors):
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert errors[name] < 1e-5, (name, errors[name])
    # Weight changes after 1 and 4 AdamW steps (each ≈ lr · g / √v: float32 rounding of g moves them a little).
    for name in [k for k in errors if k.endswith("_change")]:
        assert errors[name] < 1e-4, (name, errors[name])


def test_llamafactory_preset_runs_trl0_step(data):
    assert float(np.abs(S.trl_by_response(data, data["trl/advantages"])).max()) > 0.5  # not a trivial batch
    side = S.ppojax_side(data)
    errors = S.compare(data, side)
    assert {"step1_policy_change", "final_policy_change", "final_value_head_change"} <= set(errors)
    _check(errors)
    # Both took the same 4 optimizer steps on the same rows.
    np.testing.assert_array_equal(side["permutations"], data["permutations"])
    assert side["metrics"]["train/updates"] == 4


@pytest.mark.slow  # the same, op by op (~25 s of compilation)
def test_llamafactory_preset_runs_trl0_step_eagerly(data):
    _check(S.compare(data, S.ppojax_side(data, jit=False)))


@pytest.mark.parametrize(
    "change, upto, field",
    [
        (dict(logprob_temperature=None), "experience", "logprobs"),  # scored at the sampling temperature 0.95
        (dict(mask_mode="response_plus_one"), "experience", "advantages"),  # TRL 1.x value mask: GAE sees the +1 slot
        (dict(whiten_unbiased=False), "experience", "advantages"),
        (dict(loss_aggregation="token-mean"), "step1", "step1_policy_change"),  # token mean over the 4 rows
    ],
)
def test_the_comparison_tells_one_changed_detail_apart(data, change, upto, field):
    config = S.ppo_config(data, convention=S.ppo_config(data).convention.replace(**change))
    errors = S.compare(data, S.ppojax_side(data, config, upto=upto))
    assert errors[field] > 1e-3, (change, errors[field])
