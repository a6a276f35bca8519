"""Bad shapes get one clear line naming the function, the tensor, what was found and what was expected."""

import jax.numpy as jnp
import pytest

import ppojax

A = jnp.zeros((2, 5))
SHORT = jnp.zeros((2, 4))
FLAT = jnp.zeros((5,))

CASES = [
    (
        lambda: ppojax.compute_gae(A, SHORT, A, gamma=1.0, lam=0.95),
        r"compute_gae: values has shape \(2, 4\) but rewards has shape \(2, 5\)",
    ),
    (
        lambda: ppojax.compute_gae(FLAT, FLAT, FLAT, gamma=1.0, lam=0.95),
        r"compute_gae: rewards has shape \(5,\); expected a rank-2 array",
    ),
    (lambda: ppojax.whiten(A, SHORT), r"whiten: mask has shape \(2, 4\) but x has shape \(2, 5\)"),
    (lambda: ppojax.kl_penalty(A, SHORT), r"kl_penalty: ref_logprobs has shape \(2, 4\)"),
    (
        lambda: ppojax.kl_from_logits(jnp.zeros((2, 5, 3)), jnp.zeros((2, 5, 3)), SHORT),
        r"kl_from_logits: mask has shape \(2, 4\); expected \(2, 5\)",
    ),
    (
        lambda: ppojax.shape_rewards(jnp.zeros(3), A, A, kl_coef=0.1),
        r"shape_rewards: scores has shape \(3,\); expected \(2,\)",
    ),
    (lambda: ppojax.clipped_loss(A, A, SHORT, A), r"clipped_loss: advantages has shape \(2, 4\)"),
    (
        lambda: ppojax.clipped_loss(A, A, A, A, logits=jnp.zeros((2, 4, 7))),
        r"clipped_loss: logits has shape \(2, 4, 7\); expected \(2, 5\) \+ \(vocab,\)",
    ),
    (lambda: ppojax.value_loss(A, A, A, SHORT), r"value_loss: mask has shape \(2, 4\)"),
    (lambda: ppojax.aggregate_loss(A, A, "mean"), r"aggregate_loss: mode must be one of"),
    (lambda: ppojax.kl_for_controller(A, A, mode="sum"), r"kl_for_controller: mode must be"),
    (lambda: ppojax.score_index(A, "middle"), r"score_index: placement must be one of"),
]


@pytest.mark.parametrize("call,message", CASES)
def test_clear_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
