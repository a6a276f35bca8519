"""Sharded rollout and training on a device mesh, and multi-host runs through `jax.distributed`.

ppojax uses the distributed engine JAX already has: XLA's SPMD partitioner over a named device mesh. Nothing
here changes the math; it decides where arrays live and lets the compiler insert the collectives.

The pieces:

- `MeshConfig(data, fsdp, tensor)`: axis sizes (one may be -1, "the rest of the devices"), `make_mesh()` builds a
  `jax.sharding.Mesh` with Auto axis types (the partitioner propagates shardings between annotated points).
- `PARAM_AXES`: a table, param-path pattern -> logical axis names, one entry per tensor kind of the decoder (and
  of LoRA adapters). `DEFAULT_RULES`: logical name -> mesh axes. An unmatched parameter is an error naming it.
  The defaults are FSDP (ZeRO-3) on `fsdp`, Megatron-style tensor parallelism on `tensor`, and the batch over
  `data` x `fsdp`:

      batch -> (data, fsdp)    embed -> fsdp    vocab, heads, kv, mlp -> tensor    everything else replicated

  A dimension that the mesh axes do not divide is replicated instead (a tiny model on a large mesh still runs).
- `Layout(mesh, rules)`: the shardings of params, optimizer states, train states and batches.
- `sharded_rollout`, `sharded_score`, `sharded_update_step`, `sharded_ppo_iteration`, `sharded_ppo_phases`,
  `sharded_sft_step`, `sharded_reward_model_step`: the library's entry points under `jax.jit` with
  `in_shardings` / `out_shardings` from the layout; the train state is donated (its buffers are reused; pass
  `donate=False` to keep the input state alive, e.g. to compare or roll back).
- `load_sharded`: a Hugging Face directory read tensor by tensor straight into its sharding.
- `initialize_distributed`, `process_batch_rows`, `batch_from_process_data`, `feed_batch`: multi-host start, each process
  feeding its rows of the global batch; `to_host` (a global array's whole value on every process, gathered
  when it spans other processes), `is_primary` (process 0 writes the files meant to exist once).
- `estimate_memory`: per-device bytes of params, optimizer state, gradients, KV cache and activations for a
  mesh and batch, computed from shapes before anything is compiled.

Checkpoints: `ppojax.checkpoint.Checkpointer` saves sharded arrays as they are (each process writes its shards);
restore with `abstract_state(state, layout.ppo_state(state, config))` as the target to land on any mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ppojax import generation, train
from ppojax.models import decoder
from ppojax.models.decoder import DecoderModel
from ppojax.optim import make_optimizer

MESH_AXES = ("data", "fsdp", "tensor")

# ----------------------------------------------------------------------------------------------------------
# Logical axes of every parameter, and the logical -> mesh rules

# (pattern, logical axes). The pattern matches the END of a param path ("layers_3/attn/q/kernel" and
# "policy/adapters/layers_3/attn/q/a" alike); the first match wins. One entry per tensor kind of
# `ppojax.models.decoder` (see its params layout) and of LoRA adapters (a [in, rank], b [rank, out]).
PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    ("embed/embedding", ("vocab", "embed")),
    ("pos_embed/embedding", ("positions", "embed")),
    ("attn/(q|qkv)/kernel", ("embed", "heads")),
    ("attn/(q|qkv)/bias", ("heads",)),
    ("attn/(k|v)/kernel", ("embed", "kv")),
    ("attn/(k|v)/bias", ("kv",)),
    ("attn/o/kernel", ("heads", "embed")),
    ("attn/(q_norm|k_norm)/scale", ("head_dim",)),
    ("mlp/(gate|up)/kernel", ("embed", "mlp")),
    ("mlp/(gate|up)/bias", ("mlp",)),
    ("mlp/down/kernel", ("mlp", "embed")),
    ("(attn/o|mlp/down)/bias", ("norm",)),
    ("(attn_norm|mlp_norm|final_norm)/(scale|bias)", ("norm",)),
    ("lm_head/kernel", ("embed", "vocab")),
    ("(value_head|score)/kernel", ("embed", "head_out")),
    ("(value_head|score)/bias", ("head_out",)),
    ("attn/(q|qkv)/a", ("embed", "lora_rank")),
    ("attn/(q|qkv)/b", ("lora_rank", "heads")),
    ("attn/(k|v)/a", ("embed", "lora_rank")),
    ("attn/(k|v)/b", ("lora_rank", "kv")),
    ("attn/o/a", ("heads", "lora_rank")),
    ("attn/o/b", ("lora_rank", "embed")),
    ("mlp/(gate|up)/a", ("embed", "lora_rank")),
    ("mlp/(gate|up)/b", ("lora_rank", "mlp")),
    ("mlp/down/a", ("mlp", "lora_rank")),
    ("mlp/down/b", ("lora_rank", "embed")),
)

# Logical name -> mesh axis, tuple of mesh axes, or None (replicated). Activations use "batch", "length",
# "embed_act" (hidden [B, S, H]), "vocab" (logits) and "kv_heads" (KV cache).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("kv_heads", "tensor"),
    ("length", None),
    ("embed_act", None),
    ("positions", None),
    ("head_dim", None),
    ("head_out", None),
    ("norm", None),
    ("lora_rank", None),
)

_COMPILED_PARAM_AXES = tuple((re.compile(f"(?:^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)


class ShardingRuleError(ValueError):
    """A parameter no rule matches, or a logical axis the rules do not name; one line."""


def path_string(path) -> str:
    """A pytree key path as "a/b/0/c" (dict keys, attribute names, sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes(path: str, ndim: int, param_axes=PARAM_AXES) -> tuple[Optional[str], ...]:
    """The logical axis names of the parameter at `path` (rank `ndim`); ShardingRuleError if none matches."""
    table = _COMPILED_PARAM_AXES if param_axes is PARAM_AXES else _compile(param_axes)
    for pattern, axes in table:
        if pattern.search(path):
            if len(axes) != ndim:
                raise ShardingRuleError(
                    f"parameter {path!r}: rule {pattern.pattern!r} names {len(axes)} axes {axes}, the tensor has {ndim}"
                )
            return axes
    raise ShardingRuleError(
        f"parameter {path!r} (rank {ndim}): no entry of the sharding table matches it; add one to PARAM_AXES "
        "(pattern -> logical axes)"
    )


@functools.lru_cache(maxsize=8)
def _compile(param_axes):
    return tuple((re.compile(f"(?:^|/){pattern}$"), axes) for pattern, axes in param_axes)


# ----------------------------------------------------------------------------------------------------------
# The mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. One of them may be -1: all devices not used by the others. `data`: pure data
    parallelism (params replicated); `fsdp`: data parallelism with params, gradients and optimizer state
    sharded (ZeRO-3); `tensor`: tensor parallelism inside each layer (keep it within a host)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "mesh") -> "MeshConfig":
        """From a config mapping like `{data: 2, fsdp: 4, tensor: 1}`. Missing axes are 1, except `data`, which
        takes the rest (-1) unless another axis does: `{fsdp: -1}` is FSDP over every device."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping like {{data: 2, fsdp: 4, tensor: 1}}, found {values!r}")
        unknown = sorted(set(values) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"{source}: unknown mesh axis {unknown[0]!r}; the axes are {MESH_AXES}")
        sizes = {}
        for name in MESH_AXES:
            if name in values:
                value = values[name]
                if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                    raise ValueError(f"{source}.{name}: expected a positive integer or -1, found {value!r}")
                sizes[name] = value
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"{source}: at most one axis may be -1, found {sizes}")
        if "data" not in sizes:
            sizes["data"] = 1 if -1 in sizes.values() else -1
        return cls(**sizes)

    def sizes(self, device_count: int) -> dict[str, int]:
        """{axis: size} with the -1 resolved; ValueError if the sizes do not multiply to `device_count`."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, found {free}")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if device_count % fixed:
                raise ValueError(
                    f"mesh {self.describe()}: {device_count} devices are not a multiple of the fixed axes' {fixed}"
                )
            sizes[free[0]] = device_count // fixed
        if math.prod(sizes.values()) != device_count:
            raise ValueError(
                f"mesh {self.describe()}: axis sizes multiply to {math.prod(sizes.values())}, "
                f"but there are {device_count} devices"
            )
        return sizes

    def describe(self) -> str:
        return "{" + ", ".join(f"{name}: {getattr(self, name)}" for name in MESH_AXES) + "}"

    def make_mesh(self, devices: Optional[Sequence[Any]] = None) -> Mesh:
        """A `Mesh` over `devices` (default: all devices of all processes), axes (data, fsdp, tensor), Auto
        axis types. `jax.make_mesh` orders the devices for the hardware (tensor = the fastest-varying axis)."""
        devices = list(jax.devices() if devices is None else devices)
        sizes = self.sizes(len(devices))
        shape = tuple(sizes[name] for name in MESH_AXES)
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ----------------------------------------------------------------------------------------------------------
# Layout: shardings of params, states and batches on one mesh


def _axis_sizes(mesh_or_sizes) -> dict[str, int]:
    if isinstance(mesh_or_sizes, Mesh):
        return dict(mesh_or_sizes.shape)
    return dict(mesh_or_sizes)


def fit_spec(shape: Sequence[int], axes: Sequence[Optional[str]], sizes: Mapping[str, int], rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of an array of `shape` with logical `axes` under `rules`, on a mesh of axis `sizes`.

    A dimension keeps the mesh axes whose product divides it (checked in order, so ("data", "fsdp") may keep
    only "data"), a mesh axis already used by an earlier dimension is dropped, and axes of size 1 are dropped.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingRuleError(f"logical axis {name!r} has no rule; the rules name {sorted(table)}")
        mesh_axes = table[name]
        mesh_axes = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
        kept, product = [], 1
        for axis in mesh_axes:
            if axis not in sizes:
                raise ShardingRuleError(f"rule {name!r} -> {axis!r}: the mesh has no axis {axis!r} ({sorted(sizes)})")
            if axis in used or sizes[axis] == 1 or dim % (product * sizes[axis]):
                continue
            kept.append(axis)
            product *= sizes[axis]
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_specs(tree, sizes: Mapping[str, int], rules=DEFAULT_RULES, *, prefix: str = "", param_axes=PARAM_AXES):
    """The PartitionSpec of every leaf of a params-like tree (params, LoRA adapters, gradients), by its path.
    Rank-0 leaves are replicated; every other leaf must match `param_axes` (else ShardingRuleError)."""

    def spec(path, leaf):
        shape = np.shape(leaf)
        if len(shape) == 0:
            return P()
        name = "/".join(part for part in (prefix, path_string(path)) if part)
        return fit_spec(shape, logical_axes(name, len(shape), param_axes), sizes, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where arrays live on `mesh` under `rules` (logical -> mesh axes) and `param_axes` (path -> logical)."""

    mesh: Mesh
    rules: tuple = DEFAULT_RULES
    param_axes: tuple = PARAM_AXES

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharding(self, shape, axes) -> NamedSharding:
        """The sharding of an array of `shape` with logical `axes` (e.g. ("batch", "length"))."""
        return NamedSharding(self.mesh, fit_spec(shape, axes, self.sizes, self.rules))

    @property
    def batch_axes(self) -> tuple[str, ...]:
        axes = dict(self.rules).get("batch")
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        return tuple(a for a in axes if self.sizes.get(a, 1) > 1)

    @property
    def batch_shards(self) -> int:
        return math.prod(self.sizes[a] for a in self.batch_axes)

    @property
    def batch(self) -> NamedSharding:
        """Rows (the leading dimension) over the batch axes, the rest replicated: a prefix sharding for every
        leaf of a batch pytree. The batch size must be a multiple of `batch_shards`."""
        axes = self.batch_axes
        return NamedSharding(self.mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))

    def params(self, tree, prefix: str = ""):
        """NamedShardings of a params-like tree (params, `Lora`, ShapeDtypeStructs) by the rules."""
        specs = param_specs(tree, self.sizes, self.rules, prefix=prefix, param_axes=self.param_axes)
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs)

    def optimizer_state(self, optimizer: optax.GradientTransformation, opt_state, params_shardings):
        """Shardings of `optimizer`'s state: each params-shaped part (Adam moments, ...) as the params,
        everything else (step counts) replicated."""
        return optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            opt_state,
            params_shardings,
            transform_non_params=lambda _: self.replicated,
        )

    def ppo_state(self, state: train.PPOState, config: train.PPOConfig) -> train.PPOState:
        """Shardings of a `PPOState` (params and optimizer states by the rules, counters and key replicated)."""
        policy = self.params(state.policy)
        critic = self.params(state.critic, prefix="value_head" if config.critic_mode == "shared" else "")
        policy_tx = make_optimizer(config.policy_optimizer)
        if config.critic_mode == "separate":
            policy_opt = self.optimizer_state(policy_tx, state.policy_opt_state, policy)
            critic_tx = make_optimizer(config.critic_optimizer)
            critic_opt = self.optimizer_state(critic_tx, state.critic_opt_state, critic)
        else:
            policy_opt = self.optimizer_state(policy_tx, state.policy_opt_state, (policy, critic))
            critic_opt = jax.tree.map(lambda _: self.replicated, state.critic_opt_state)
        rep = self.replicated
        return train.PPOState(
            step=rep,
            iteration=rep,
            policy=policy,
            policy_opt_state=policy_opt,
            critic=critic,
            critic_opt_state=critic_opt,
            kl=jax.tree.map(lambda _: rep, state.kl),
            key=rep,
        )

    def train_state(self, state: train.TrainState, optimizer: optax.GradientTransformation) -> train.TrainState:
        """Shardings of an SFT / reward-model `TrainState`."""
        params = self.params(state.params)
        return train.TrainState(
            step=self.replicated, params=params, opt_state=self.optimizer_state(optimizer, state.opt_state, params)
        )

    def check_batch(self, tree, what: str) -> None:
        """ValueError unless every leaf's leading dimension is a multiple of `batch_shards`."""
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            rows = np.shape(leaf)[0] if np.ndim(leaf) else None
            if rows is not None and rows % self.batch_shards:
                raise ValueError(
                    f"{what}{'/' + path_string(path) if path else ''}: {rows} rows are not a multiple of the "
                    f"{self.batch_shards} batch shards of the mesh ({', '.join(self.batch_axes)})"
                )


def _identity(x):
    return x


def place(tree, shardings):
    """Puts a tree onto matching shardings (a prefix tree of shardings is fine). Works across processes: each
    process passes the same global values and keeps its devices' blocks (`jax.device_put` alone accepts only
    shardings of this process's devices); an array that already spans processes (computed from sharded
    inputs) is resharded by an identity program."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put_one(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard on the devices
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            return jax.jit(_identity, out_shardings=sharding)(x)
        if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            data = put_one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(
        lambda sharding, sub: jax.tree.map(lambda x: put_one(x, sharding), sub),
        shardings,
        tree,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def abstract_state(tree, shardings):
    """`jax.ShapeDtypeStruct` leaves carrying `shardings`: an orbax restore target that lands on that mesh,
    e.g. `checkpointer.restore(abstract_state(state, layout.ppo_state(state, config)))`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding), tree, shardings
    )


# ----------------------------------------------------------------------------------------------------------
# Activation constraints (the decoder's optional hook)


@contextlib.contextmanager
def activation_sharding(layout: Layout):
    """While tracing, `ppojax.models.decoder.constrain` pins activations to `layout` (batch over the batch
    axes, hidden replicated, logits by vocab): the partitioner then keeps the batch split through FSDP layers
    instead of re-sharding activations like the weights."""

    def hook(x, axes):
        if x.ndim != len(axes):
            return x
        return jax.lax.with_sharding_constraint(x, layout.sharding(x.shape, axes))

    token = decoder.ACTIVATION_HOOK.set(hook)
    try:
        yield
    finally:
        decoder.ACTIVATION_HOOK.reset(token)


# ----------------------------------------------------------------------------------------------------------
# Sharded entry points


def _structure_key(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


class ShardedFunction:
    """`fn` under `jax.jit` with shardings derived from its arguments: `in_roles[i](layout, arg_i)` and
    `out_role(layout, args)` return sharding trees (or prefixes); `donate_argnums` are donated. Compiled once
    per argument structure and shapes; traced inside `activation_sharding(layout)`."""

    def __init__(self, fn, layout: Layout, in_roles, out_role, *, donate_argnums=(), compiler_options=None, name=""):
        self.fn, self.layout, self.in_roles, self.out_role = fn, layout, tuple(in_roles), out_role
        self.donate_argnums = tuple(donate_argnums)
        self.compiler_options = compiler_options
        self.name = name or getattr(fn, "__name__", "sharded function")
        self._compiled: dict = {}

    def jitted(self, *args):
        """The `jax.jit` object for these arguments (e.g. to `.lower(...)` and inspect the program)."""
        key = _structure_key(args)
        if key not in self._compiled:
            if len(args) != len(self.in_roles):
                raise TypeError(f"{self.name}: expected {len(self.in_roles)} arguments, got {len(args)}")
            in_shardings = tuple(role(self.layout, arg) for role, arg in zip(self.in_roles, args))
            self._compiled[key] = jax.jit(
                self.fn,
                in_shardings=in_shardings,
                out_shardings=self.out_role(self.layout, args),
                donate_argnums=self.donate_argnums,
                compiler_options=self.compiler_options,
            )
        return self._compiled[key]

    def __call__(self, *args):
        compiled = self.jitted(*args)
        with activation_sharding(self.layout):
            return compiled(*args)


def _params_role(layout, tree):
    return None if tree is None else layout.params(tree)


def _batch_role(layout, tree):
    layout.check_batch(tree, "batch")
    return layout.batch


def _replicated_role(layout, tree):
    return layout.replicated


def _scalar(x, dtype):
    return jnp.asarray(x, dtype)


def sharded_rollout(
    model: DecoderModel, layout: Layout, *, max_new_tokens: int, top_k: int = 0, compiler_options=None
) -> Callable:
    """rollout(params, prompt_ids, prompt_mask, key, *, temperature=1.0, top_p=1.0, stop_token_ids,
    pad_token_id, lora=None, repetition_penalty=None) -> `Rollout` with every field batch-sharded. See
    `ppojax.generation.rollout`."""

    def run(params, prompt_ids, prompt_mask, key, temperature, top_p, stop_token_ids, pad_token_id, lora, penalty):
        return generation.rollout(
            model,
            params,
            prompt_ids,
            prompt_mask,
            key,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=stop_token_ids,
            pad_token_id=pad_token_id,
            lora=lora,
            repetition_penalty=penalty,
        )

    rep = _replicated_role
    sharded = ShardedFunction(
        run,
        layout,
        (_params_role, _batch_role, _batch_role, rep, rep, rep, rep, rep, _params_role, rep),
        lambda layout, args: layout.batch,
        compiler_options=compiler_options,
        name="rollout",
    )

    def rollout(
        params,
        prompt_ids,
        prompt_mask,
        key,
        *,
        temperature=1.0,
        top_p=1.0,
        stop_token_ids,
        pad_token_id,
        lora=None,
        repetition_penalty=None,
    ) -> generation.Rollout:
        penalty = generation.repetition_penalty_or_none(repetition_penalty)
        return sharded(
            params,
            prompt_ids,
            prompt_mask,
            key,
            _scalar(temperature, jnp.float32),
            _scalar(top_p, jnp.float32),
            jnp.asarray(stop_token_ids, jnp.int32).reshape(-1),
            _scalar(pad_token_id, jnp.int32),
            lora,
            None if penalty is None else _scalar(penalty, jnp.float32),
        )

    rollout.sharded = sharded
    return rollout


def sharded_score(
    policy_model: DecoderModel,
    critic_model: DecoderModel,
    reward_model: DecoderModel,
    layout: Layout,
    *,
    compiler_options=None,
) -> Callable:
    """score(policy_params, prompt_ids, prompt_mask, response_ids, response_mask, *, temperature,
    critic_params, reward_params, ref_params=None, lora=None, old_logprobs=None, value_mask=None) -> `Scores`,
    batch-sharded.
    See `ppojax.generation.score`."""

    def run(
        policy_params,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        temperature,
        critic,
        reward,
        ref,
        lora,
        old_logprobs,
        value_mask,
    ):
        return generation.score(
            policy_model,
            policy_params,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            temperature=temperature,
            critic_model=critic_model,
            critic_params=critic,
            reward_model=reward_model,
            reward_params=reward,
            ref_params=ref,
            lora=lora,
            old_logprobs=old_logprobs,
            value_mask=value_mask,
        )

    b, p = _batch_role, _params_role
    optional_b = lambda layout, tree: None if tree is None else b(layout, tree)  # noqa: E731
    sharded = ShardedFunction(
        run,
        layout,
        (p, b, b, b, b, _replicated_role, p, p, p, p, optional_b, optional_b),
        lambda layout, args: layout.batch,
        compiler_options=compiler_options,
        name="score",
    )

    def score(
        policy_params,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        *,
        temperature,
        critic_params,
        reward_params,
        ref_params=None,
        lora=None,
        old_logprobs=None,
        value_mask=None,
    ) -> generation.Scores:
        temperature = _scalar(temperature, jnp.float32)
        batch = (prompt_ids, prompt_mask, response_ids, response_mask)
        return sharded(
            policy_params, *batch, temperature, critic_params, reward_params, ref_params, lora, old_logprobs, value_mask
        )

    score.sharded = sharded
    return score


def _ppo_roles(config):
    def state_role(layout, state):
        return layout.ppo_state(state, config)

    def state_out(layout, args):
        return layout.ppo_state(args[0], config)

    return state_role, state_out


def sharded_update_step(
    config: train.PPOConfig, models: train.PPOModels, layout: Layout, *, compiler_options=None, donate: bool = True
) -> ShardedFunction:
    """update_step(state, minibatch, ref_params) -> (state, metrics); the state is donated, the minibatch
    batch-sharded, metrics replicated. See `ppojax.train.update_step`."""
    state_role, state_out = _ppo_roles(config)
    return ShardedFunction(
        functools.partial(train.update_step, config=config, models=models),
        layout,
        (state_role, _batch_role, _params_role),
        lambda layout, args: (state_out(layout, args), layout.replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
        name="update_step",
    )


def sharded_ppo_iteration(
    config: train.PPOConfig, models: train.PPOModels, layout: Layout, *, compiler_options=None, donate: bool = True
) -> ShardedFunction:
    """iteration(state, prompts, ref_params, reward_params) -> (state, metrics, experience), one program;
    state donated, prompts `(ids, mask)` and the experience batch-sharded. See `ppojax.train.ppo_iteration`."""
    state_role, state_out = _ppo_roles(config)
    return ShardedFunction(
        functools.partial(train.ppo_iteration, config=config, models=models),
        layout,
        (state_role, _batch_role, _params_role, _params_role),
        lambda layout, args: (state_out(layout, args), layout.replicated, layout.batch),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
        name="ppo_iteration",
    )


def sharded_ppo_phases(
    config: train.PPOConfig, models: train.PPOModels, layout: Layout, *, compiler_options=None, donate: bool = True
) -> tuple[ShardedFunction, ShardedFunction]:
    """(collect, train_on_batch) as in `ppojax.train.make_ppo_phases`, sharded, the state donated:
    collect(state, prompts, ref_params, reward_params) -> (state, experience);
    train_on_batch(state, experience, ref_params) -> (state, metrics)."""
    state_role, state_out = _ppo_roles(config)
    collect = ShardedFunction(
        functools.partial(train.collect, config=config, models=models),
        layout,
        (state_role, _batch_role, _params_role, _params_role),
        lambda layout, args: (state_out(layout, args), layout.batch),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
        name="collect",
    )
    train_on_batch = ShardedFunction(
        functools.partial(train.train_on_batch, config=config, models=models),
        layout,
        (state_role, _batch_role, _params_role),
        lambda layout, args: (state_out(layout, args), layout.replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
        name="train_on_batch",
    )
    return collect, train_on_batch


def sharded_train_step(
    step: Callable,
    optimizer: optax.GradientTransformation,
    layout: Layout,
    *,
    compiler_options=None,
    name="",
    donate: bool = True,
) -> ShardedFunction:
    """Any step(state: TrainState, batch, base_params) -> (state, metrics) over `optimizer`'s state, sharded:
    the `TrainState` donated, the batch (a pytree of [B, ...] arrays) split over the batch axes, base params by
    the rules (None without LoRA), metrics replicated. `sharded_sft_step` and `sharded_reward_model_step` are
    this with `ppojax.train`'s steps; a runner's own loss goes the same way."""
    return ShardedFunction(
        step,
        layout,
        (lambda layout, state: layout.train_state(state, optimizer), _batch_role, _params_role),
        lambda layout, args: (layout.train_state(args[0], optimizer), layout.replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
        name=name or getattr(step, "__name__", "train step"),
    )


def sharded_sft_step(
    model: DecoderModel,
    optimizer: optax.GradientTransformation,
    layout: Layout,
    *,
    compiler_options=None,
    donate: bool = True,
) -> ShardedFunction:
    """sft_step(state, batch, base_params) -> (state, metrics); `TrainState` donated, the `SequenceBatch`
    batch-sharded (pass base_params=None without LoRA). See `ppojax.train.sft_step`."""
    step = functools.partial(train.sft_step, model=model, optimizer=optimizer)
    return sharded_train_step(
        step, optimizer, layout, compiler_options=compiler_options, name="sft_step", donate=donate
    )


def sharded_reward_model_step(
    model: DecoderModel,
    optimizer: optax.GradientTransformation,
    layout: Layout,
    *,
    compiler_options=None,
    donate: bool = True,
) -> ShardedFunction:
    """reward_model_step(state, batch, base_params) -> (state, metrics); `TrainState` donated, the
    `PreferenceBatch` batch-sharded. See `ppojax.train.reward_model_step`."""
    step = functools.partial(train.reward_model_step, model=model, optimizer=optimizer)
    return sharded_train_step(
        step, optimizer, layout, compiler_options=compiler_options, name="reward_model_step", donate=donate
    )


# ----------------------------------------------------------------------------------------------------------
# Loading straight into shardings


def load_sharded(path: str, layout: Layout, *, head: str = "lm", dtype=jnp.float32) -> tuple[DecoderModel, dict]:
    """`ppojax.models.load_pretrained` with every tensor placed directly into its sharding: each device's
    block is read from the safetensors file (only that slice) and put on that device; no tensor is ever
    whole on one device. In a multi-host run each process reads only the blocks of its own devices."""
    from ppojax.models.hf import load_pretrained

    return load_pretrained(path, head=head, dtype=dtype, shardings=lambda model: layout.params(model.param_shapes()))


# ----------------------------------------------------------------------------------------------------------
# Multi-host


class DistributedInfo(NamedTuple):
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def _env_int(env, name):
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, found {value!r}") from None


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    *,
    auto: bool = False,
    env: Optional[Mapping[str, str]] = None,
) -> DistributedInfo:
    """Starts `jax.distributed` (call before any other JAX work) and returns who this process is.

    Settings, first found wins: the arguments; the environment variables `JAX_COORDINATOR_ADDRESS` (host:port
    of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; with `auto=True` JAX's cluster detection (Cloud
    TPU pod slices, SLURM, Open MPI, Kubernetes fill in everything). With no setting and `auto=False` this is
    a single-process run and nothing is started. Calling it again after a start is a no-op.
    """
    env = os.environ if env is None else env
    if not jax.distributed.is_initialized():
        coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
        given = (coordinator_address, num_processes, process_id)
        if any(v is not None for v in given) or auto:
            if coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator_address):
                raise ValueError(f"coordinator_address: expected host:port, found {coordinator_address!r}")
            if num_processes is not None and num_processes < 1:
                raise ValueError(f"num_processes: expected >= 1, found {num_processes}")
            if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
                raise ValueError(f"process_id: expected 0 <= process_id < {num_processes}, found {process_id}")
            if not auto and None in given:
                missing = [
                    n for n, v in zip(("coordinator_address", "num_processes", "process_id"), given) if v is None
                ]
                raise ValueError(
                    f"distributed start: {', '.join(missing)} not set (arguments, or JAX_COORDINATOR_ADDRESS / "
                    "JAX_NUM_PROCESSES / JAX_PROCESS_ID); set all three, or use auto detection on a cluster"
                )
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                local_device_ids=local_device_ids,
            )
    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def process_batch_rows(layout: Layout, global_rows: int) -> slice:
    """The rows of a global batch of `global_rows` that this process feeds (its devices' shards of the batch
    sharding, one contiguous range). With one process: all rows."""
    if global_rows % layout.batch_shards:
        raise ValueError(f"global batch of {global_rows} rows is not a multiple of {layout.batch_shards} batch shards")
    indices = layout.batch.addressable_devices_indices_map((global_rows,)).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [global_rows if index[0].stop is None else index[0].stop for index in indices]
    start, stop = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops):
        covered.update(range(a, b))
    if covered != set(range(start, stop)):
        raise ValueError(f"this process's batch rows are not contiguous ({sorted(covered)}); reorder the mesh devices")
    return slice(start, stop)


def batch_from_process_data(layout: Layout, local_tree, global_rows: int):
    """Global batch-sharded arrays from each process's rows (`process_batch_rows`): every process calls this
    with its own part; the result is one logical batch of `global_rows` rows."""
    rows = process_batch_rows(layout, global_rows)

    def make(local):
        local = np.asarray(local)
        if local.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"process {jax.process_index()}: local batch has {local.shape[0]} rows, expected rows "
                f"{rows.start}:{rows.stop} of {global_rows} ({rows.stop - rows.start} rows)"
            )
        return jax.make_array_from_process_local_data(layout.batch, local, (global_rows,) + local.shape[1:])

    return jax.tree.map(make, local_tree)


def feed_batch(layout: Layout, tree):
    """A pytree of host arrays holding the whole global batch (every process has the same values) -> the global
    batch-sharded arrays, this process feeding its rows (`process_batch_rows`)."""
    global_rows = jax.tree.leaves(tree)[0].shape[0]
    rows = process_batch_rows(layout, global_rows)
    return batch_from_process_data(layout, jax.tree.map(lambda a: np.asarray(a)[rows], tree), global_rows)


def is_primary() -> bool:
    """True in the process that writes files meant to exist once (reports, exported models): process 0.
    Checkpoints are the exception: every process saves its own shards through orbax."""
    return jax.process_index() == 0


def to_host(tree):
    """Every array leaf of `tree` as a numpy array holding its whole (global) value, on every process.

    With one process this is `jax.device_get`. In a multi-host run an array with blocks on other processes'
    devices (a batch-sharded experience, FSDP-sharded params) is gathered with a collective, one leaf at a
    time (`multihost_utils.process_allgather`), so every process must call this with the same tree; replicated
    and process-local arrays are read locally."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def sync_processes(name: str) -> None:
    """A barrier over every process (nothing with one process): e.g. after process 0 removed a directory the
    others are about to write into."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


def setup(mesh: Any = None, distributed: Any = None, *, source: str = "config") -> tuple[Layout, DistributedInfo]:
    """What a run does first: the multi-host start, then the mesh. For config keys such as

        mesh: {data: 2, fsdp: 4, tensor: 1}        # or a MeshConfig; None: every device on `data`
        distributed: auto                          # or {coordinator_address: host:port, num_processes: N,
                                                   #     process_id: i}; None: the JAX_* variables, if set
    Returns (layout with the default rules, this process's DistributedInfo).
    """
    if distributed in (None, False):
        info = initialize_distributed()
    elif distributed is True or distributed == "auto":
        info = initialize_distributed(auto=True)
    elif isinstance(distributed, Mapping):
        unknown = sorted(set(distributed) - set(DISTRIBUTED_KEYS))
        if unknown:
            raise ValueError(f"{source}: distributed.{unknown[0]} is not a key; the keys are {DISTRIBUTED_KEYS}")
        info = initialize_distributed(**distributed)
    else:
        raise ValueError(
            f"{source}: distributed: expected auto, a mapping of {DISTRIBUTED_KEYS}, or null; found {distributed!r}"
        )
    if mesh is None:
        mesh = MeshConfig()
    elif not isinstance(mesh, MeshConfig):
        mesh = MeshConfig.from_dict(mesh, f"{source}: mesh")
    return Layout(mesh.make_mesh()), info


# ----------------------------------------------------------------------------------------------------------
# Memory estimate

_GIB = 1024**3


class MemoryRow(NamedTuple):
    name: str
    bytes_per_device: int
    detail: str


class MemoryEstimate(NamedTuple):
    """Per-device bytes by category (rows), their total, and the mesh they assume."""

    rows: tuple[MemoryRow, ...]
    mesh: dict

    @property
    def total(self) -> int:
        return sum(row.bytes_per_device for row in self.rows)

    def format(self) -> str:
        width = max(len(row.name) for row in self.rows + (MemoryRow("total", 0, ""),))
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"memory estimate per device (mesh {mesh}; a lower bound: XLA temporaries not included):"]
        for row in self.rows + (MemoryRow("total", self.total, ""),):
            lines.append(f"  {row.name:<{width}}  {_human(row.bytes_per_device):>10}  {row.detail}".rstrip())
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _per_device_elements(shapes_tree, sizes, rules, prefix="") -> int:
    specs = param_specs(shapes_tree, sizes, rules, prefix=prefix)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(shapes_tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        shards = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                shards *= sizes[axis]
        total += math.prod(leaf.shape) // shards
    return total


def _shards(sizes, rules, logical: str, dim: int) -> int:
    """How many ways a dimension of size `dim` with `logical` name is split on this mesh."""
    spec = fit_spec((dim,), (logical,), sizes, rules)
    entry = spec[0] if len(spec) else None
    return math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else (entry or ())))


def estimate_memory(
    mesh_sizes: Mapping[str, int],
    *,
    models: Mapping[str, tuple[DecoderModel, bool]],
    batch_size: int,
    micro_batch_size: int,
    prompt_length: int,
    max_new_tokens: int,
    rollout_model: Optional[str] = "policy",
    master_dtype: Optional[str] = None,
    moments: int = 2,
    rules=DEFAULT_RULES,
) -> MemoryEstimate:
    """Per-device memory of a run, from shapes only (nothing is allocated or compiled).

    models: name -> (model, trainable), e.g. {"policy": (policy, True), "reference": (policy, False),
    "critic": (critic, True), "reward": (reward, False)}. mesh_sizes: {"data": 2, "fsdp": 4, "tensor": 1}.

    Rows (each sharded as the rules shard it; B_d = rows per device = ceil(rows / batch shards)):
    - params <name>: every tensor's elements / its shards x itemsize (trainable params in `master_dtype` if set).
    - optimizer state: `moments` (Adam: 2) params-shaped tensors per trainable model, in the trainable dtype.
    - gradients: one float32 params-shaped accumulator per trainable model.
    - KV cache: 2 (K, V) x layers x B_d(batch_size) x (P + N) x kv_heads / shards x head_dim x itemsize.
    - activations: for each trainable model, what one micro-batch's backward pass keeps, per layer and token
      (S = P + N; each width divided by its shards): 4 H (norm inputs and outputs) + 2 Hq D (q, attention
      output) + 2 Hkv D (k, v) + 3 I (gate, up, their product) at the compute itemsize, plus the attention
      logits and probabilities 2 x Hq x S in float32; with `remat`, H per layer plus one layer's worth. An LM
      head adds 2 x S x V float32 (logits and log-softmax, every position) per row.
    XLA's temporaries are not included: the params and optimizer rows match XLA's argument sizes exactly, but
    a compiled FSDP train step measured here used ~3.3x the gradients + activations rows in temporaries
    (gathered weights, unsharded gradients, attention logits). Treat the total as a lower bound.
    """
    sizes = {name: int(size) for name, size in mesh_sizes.items()}
    batch_axes = dict(rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    batch_shards = math.prod(sizes.get(a, 1) for a in batch_axes)
    rows_per_device = -(-batch_size // batch_shards)
    micro_per_device = -(-micro_batch_size // batch_shards)
    seq = prompt_length + max_new_tokens
    rows, opt_bytes, grad_bytes, act_bytes = [], 0, 0, 0
    act_detail = []
    for name, (model, trainable) in models.items():
        dtype = jnp.dtype(master_dtype if (trainable and master_dtype) else model.dtype)
        elements = _per_device_elements(model.param_shapes(), sizes, rules)
        rows.append(MemoryRow(f"params {name}", elements * dtype.itemsize, f"{elements:,} elements, {dtype.name}"))
        if not trainable:
            continue
        opt_bytes += moments * elements * dtype.itemsize
        grad_bytes += elements * 4
        cfg = model.config
        itemsize = jnp.dtype(model.dtype).itemsize
        hidden = cfg.hidden_size
        q_cols = cfg.num_heads * cfg.head_dim
        q_cols //= _shards(sizes, rules, "heads", q_cols)
        kv_cols = cfg.num_kv_heads * cfg.head_dim
        kv_cols //= _shards(sizes, rules, "kv", kv_cols)
        mlp_cols = cfg.intermediate_size // _shards(sizes, rules, "mlp", cfg.intermediate_size)
        prob_heads = cfg.num_heads // _shards(sizes, rules, "heads", cfg.num_heads)
        layer = (4 * hidden + 2 * q_cols + 2 * kv_cols + 3 * mlp_cols) * itemsize + 2 * prob_heads * seq * 4
        if model.remat:
            per_token = cfg.num_layers * hidden * itemsize + layer
        else:
            per_token = cfg.num_layers * layer
        model_act = micro_per_device * seq * per_token
        if model.head == "lm":
            vocab = cfg.vocab_size // _shards(sizes, rules, "vocab", cfg.vocab_size)
            model_act += micro_per_device * seq * vocab * 4 * 2  # every position's logits are computed
        act_bytes += model_act
        act_detail.append(name)
    if any(trainable for _, trainable in models.values()):
        rows.append(MemoryRow("optimizer state", opt_bytes, f"{moments} moments per trainable param"))
        rows.append(MemoryRow("gradients", grad_bytes, "float32 accumulator"))
    if rollout_model is not None:
        model = models[rollout_model][0]
        cfg = model.config
        kv_heads = cfg.num_kv_heads // _shards(sizes, rules, "kv_heads", cfg.num_kv_heads)
        cache = 2 * cfg.num_layers * rows_per_device * seq * kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize
        rows.append(MemoryRow("KV cache", cache, f"{rows_per_device} rows x {seq} slots"))
    if act_detail:
        rows.append(
            MemoryRow(
                "activations", act_bytes, f"{micro_per_device} rows x {seq} tokens, backward of {', '.join(act_detail)}"
            )
        )
    return MemoryEstimate(tuple(rows), sizes)


def estimate_ppo_memory(
    config: train.PPOConfig,
    models: train.PPOModels,
    mesh_sizes: Mapping[str, int],
    *,
    prompt_length: int,
    lora: bool = False,
    rules=DEFAULT_RULES,
) -> MemoryEstimate:
    """`estimate_memory` for a PPO run: the policy (trainable unless `lora`, whose adapters are left out), its
    frozen reference (the same base with LoRA: not counted twice), the critic (trainable, "separate" / "joint")
    and the reward model (frozen); micro-batch and widths from `config`."""
    entries = {"policy": (models.policy, not lora)}
    if not lora:
        entries["reference"] = (models.policy, False)
    if models.critic is not None:
        entries["critic"] = (models.critic, True)
    if models.reward is not None:
        entries["reward"] = (models.reward, False)
    return estimate_memory(
        mesh_sizes,
        models=entries,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_size,
        prompt_length=prompt_length,
        max_new_tokens=config.max_new_tokens,
        master_dtype=config.master_dtype,
        rules=rules,
    )
