"""Gradient checkpointing (DecoderModel(remat=True)): same params, same outputs, same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppojax.models import DecoderModel, ModelConfig

CONFIG = ModelConfig(
    model_type="gpt2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    max_position_embeddings=32,
    norm="layer",
    activation="gelu_new",
    gated_mlp=False,
    position="learned",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    fused_qkv=True,
)
PLAIN, REMAT = DecoderModel(CONFIG), DecoderModel(CONFIG, remat=True)
PARAMS = PLAIN.init_params(jax.random.key(0))
IDS = jax.random.randint(jax.random.key(1), (3, 9), 0, 64)
MASK = jnp.asarray(np.tri(3, 9, 6, dtype=np.int32)[:, ::-1].copy())  # left padding


def _loss(model, params):
    return jnp.sum(jax.nn.log_softmax(model.apply(params, IDS, MASK).logits.astype(jnp.float32))[..., 5])


def test_remat_keeps_params_and_outputs():
    assert jax.tree.structure(REMAT.param_shapes()) == jax.tree.structure(PARAMS)
    np.testing.assert_array_equal(
        np.asarray(REMAT.apply(PARAMS, IDS, MASK).logits), np.asarray(PLAIN.apply(PARAMS, IDS, MASK).logits)
    )
    # The rematerialisation is really in the program.
    assert "remat" in str(jax.make_jaxpr(lambda p: _loss(REMAT, p))(PARAMS))
    assert "remat" not in str(jax.make_jaxpr(lambda p: _loss(PLAIN, p))(PARAMS))


@pytest.mark.slow
def test_remat_gradients_match():
    grads = [jax.jit(jax.grad(lambda p, m=m: _loss(m, p)))(PARAMS) for m in (PLAIN, REMAT)]
    for a, b in zip(*(jax.tree.leaves(g) for g in grads)):
        # float32 rounding relative to the leaf's scale: the recomputed forward is fused differently.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(a)).max())
