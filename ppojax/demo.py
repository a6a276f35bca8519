"""A small, real PPO-RLHF loop on a tabular policy, built only from ppojax's public pure functions.

The "language model" is a table of logits per response position over a toy vocabulary, so the whole run
takes seconds on a laptop CPU while exercising every piece of the math: sampling with a stop token,
KL-shaped rewards against a frozen reference, GAE, whitening, the clipped policy and value losses, and the
adaptive KL controller. The reward counts a target token and pays for stopping.

This is the placeholder main job until the synthetic-language pipeline lands.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ppojax.kl import KLControllerState, adaptive_kl_controller
from ppojax.presets import Convention, assemble_advantages, get_preset, ppo_losses
from ppojax.stats import masked_mean


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    vocab_size: int = 8
    response_length: int = 8
    stop_token: int = 7
    target_token: int = 3
    batch_size: int = 64
    minibatches: int = 4
    ppo_epochs: int = 4
    learning_rate: float = 0.05
    kl_target: float = 2.0  # nats per sequence
    preset: str = "ppojax"


class Params(NamedTuple):
    logits: jax.Array  # [T, V] policy logits per response position
    values: jax.Array  # [T] critic value per position


class DemoState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    kl: KLControllerState
    key: jax.Array


def sample(cfg: DemoConfig, logits: jax.Array, key: jax.Array):
    """Responses [B, T], right-padded after the first stop token (kept); behaviour log-probs [B, T]."""
    tokens = jax.random.categorical(key, logits, shape=(cfg.batch_size, cfg.response_length))
    is_stop = tokens == cfg.stop_token
    stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop  # stop tokens strictly before t
    mask = stopped_before == 0
    return tokens, mask, token_logprobs(logits, tokens), jnp.any(is_stop, axis=1)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[T, V] per-position logits, [B, T] tokens -> [B, T] log-probs."""
    log_softmax = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(
        jnp.broadcast_to(log_softmax, tokens.shape + log_softmax.shape[-1:]), tokens[..., None], -1
    )[..., 0]


def kl_controller(cfg: DemoConfig, convention: Convention):
    return adaptive_kl_controller(convention.kl_coef, cfg.kl_target, horizon=200)


def init(cfg: DemoConfig, key: jax.Array):
    key, init_key = jax.random.split(key)
    params = Params(
        jax.random.normal(init_key, (cfg.response_length, cfg.vocab_size)) * 0.1, jnp.zeros(cfg.response_length)
    )
    optimizer = optax.adam(cfg.learning_rate)
    state = DemoState(params, optimizer.init(params), kl_controller(cfg, get_preset(cfg.preset)).init(), key)
    return state, params.logits  # the reference policy is the initial one


@functools.partial(jax.jit, static_argnums=(0, 1))
def iteration(cfg: DemoConfig, convention: Convention, state: DemoState, ref_logits: jax.Array):
    """One PPO iteration: rollout, reward, advantages, `ppo_epochs` passes of minibatch updates."""
    optimizer = optax.adam(cfg.learning_rate)
    controller = kl_controller(cfg, convention)
    key, sample_key, perm_key = jax.random.split(state.key, 3)
    tokens, mask, logprobs, stopped = sample(cfg, state.params.logits, sample_key)
    scores = jnp.sum((tokens == cfg.target_token) & mask, axis=1) / cfg.response_length + stopped.astype(jnp.float32)
    values = jnp.broadcast_to(state.params.values, tokens.shape)
    batch = assemble_advantages(
        convention,
        scores=scores,
        logprobs=logprobs,
        ref_logprobs=token_logprobs(ref_logits, tokens),
        values=values,
        response_mask=mask,
        kl_coef=state.kl.coef,
        stopped=stopped,
    )

    def loss_fn(params, rows):
        pg, vf, stats = ppo_losses(
            convention,
            logprobs=token_logprobs(params.logits, tokens[rows]),
            old_logprobs=logprobs[rows],
            advantages=batch.advantages[rows],
            values=jnp.broadcast_to(params.values, tokens[rows].shape),
            old_values=values[rows],
            returns=batch.returns[rows],
            policy_mask=batch.policy_mask[rows],
            value_mask=batch.value_mask[rows],
        )
        return pg + convention.vf_coef * vf, stats

    def minibatch_step(carry, rows):
        params, opt_state = carry
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), stats

    def epoch(carry, epoch_key):
        rows = jax.random.permutation(epoch_key, cfg.batch_size).reshape(cfg.minibatches, -1)
        return jax.lax.scan(minibatch_step, carry, rows)

    (params, opt_state), stats = jax.lax.scan(
        epoch, (state.params, state.opt_state), jax.random.split(perm_key, cfg.ppo_epochs)
    )
    kl_state = controller.update(state.kl, batch.controller_kl, cfg.batch_size)
    metrics = {
        "score": jnp.mean(scores),
        "kl": batch.controller_kl,
        "kl_coef": state.kl.coef,
        "length": jnp.mean(jnp.sum(mask, axis=1)),
        "target_rate": masked_mean(tokens == cfg.target_token, mask),
        "clipfrac": jnp.mean(stats["clipfrac"]),
        "first_ratio_max": stats["ratio_max"][0, 0],
    }
    return DemoState(params, opt_state, kl_state, key), metrics


def run(cfg: DemoConfig = DemoConfig(), iterations: int = 40, seed: int = 0, log=print):
    """Runs the demo; returns the list of per-iteration metrics (floats)."""
    convention = get_preset(cfg.preset)
    state, ref_logits = init(cfg, jax.random.PRNGKey(seed))
    history = []
    for i in range(iterations):
        state, metrics = iteration(cfg, convention, state, ref_logits)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append(metrics)
        if log is not None and (i % 5 == 0 or i == iterations - 1):
            log(
                f"iter {i:3d}  score {metrics['score']:.3f}  kl {metrics['kl']:.3f}  kl_coef {metrics['kl_coef']:.4f}  "
                f"length {metrics['length']:.2f}  target-token rate {metrics['target_rate']:.3f}  clipfrac {metrics['clipfrac']:.3f}"
            )
    return history
