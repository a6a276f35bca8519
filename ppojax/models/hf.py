"""Import from and export to Hugging Face checkpoint directories, without torch.

One declarative table per family maps each HF tensor name to our params path, with the transform
between them (`transpose`: torch `nn.Linear` stores `(out, in)`, we store `(in, out)`; GPT-2's `Conv1D`
is already `(in, out)`). The same table is read in both directions. A rule applies to a model exactly
when its params tree has the rule's path, so biases, q/k norms, learned positions and untied LM heads
need no flags here: the model definition decides.

Only safetensors are read (`model.safetensors` or a sharded `model.safetensors.index.json`); pickle
files (`pytorch_model.bin`, `*.pt`, ...) are never opened.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ppojax.models.config import CheckpointError, ModelConfig, from_hf_config, to_hf_config
from ppojax.models.decoder import HEADS, DecoderModel
from ppojax.models.lora import merge_lora

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Rule(NamedTuple):
    """HF tensor name pattern <-> our params path pattern (`{i}` = layer index), and whether the 2-D
    tensor is stored transposed in HF."""

    hf: str
    ours: str
    transpose: bool = False


def _linear(hf_module: str, ours: str, transpose: bool = True) -> tuple[Rule, ...]:
    return (Rule(f"{hf_module}.weight", f"{ours}/kernel", transpose), Rule(f"{hf_module}.bias", f"{ours}/bias"))


def _layer_norm(hf_module: str, ours: str) -> tuple[Rule, ...]:
    return (Rule(f"{hf_module}.weight", f"{ours}/scale"), Rule(f"{hf_module}.bias", f"{ours}/bias"))


_LLAMA_LAYER = "model.layers.{i}"
LLAMA_FAMILY_TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule(f"{_LLAMA_LAYER}.input_layernorm.weight", "layers_{i}/attn_norm/scale"),
    *_linear(f"{_LLAMA_LAYER}.self_attn.q_proj", "layers_{i}/attn/q"),
    *_linear(f"{_LLAMA_LAYER}.self_attn.k_proj", "layers_{i}/attn/k"),
    *_linear(f"{_LLAMA_LAYER}.self_attn.v_proj", "layers_{i}/attn/v"),
    *_linear(f"{_LLAMA_LAYER}.self_attn.o_proj", "layers_{i}/attn/o"),
    Rule(f"{_LLAMA_LAYER}.self_attn.q_norm.weight", "layers_{i}/attn/q_norm/scale"),
    Rule(f"{_LLAMA_LAYER}.self_attn.k_norm.weight", "layers_{i}/attn/k_norm/scale"),
    Rule(f"{_LLAMA_LAYER}.post_attention_layernorm.weight", "layers_{i}/mlp_norm/scale"),
    *_linear(f"{_LLAMA_LAYER}.mlp.gate_proj", "layers_{i}/mlp/gate"),
    *_linear(f"{_LLAMA_LAYER}.mlp.up_proj", "layers_{i}/mlp/up"),
    *_linear(f"{_LLAMA_LAYER}.mlp.down_proj", "layers_{i}/mlp/down"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "lm_head/kernel", True),
    Rule("score.weight", "score/kernel", True),
    Rule("score.weight", "value_head/kernel", True),
    Rule("score.bias", "score/bias"),  # config.head_bias: from value_head.safetensors (models/valuehead.py)
    Rule("score.bias", "value_head/bias"),
)

_GPT2_LAYER = "transformer.h.{i}"
GPT2_TABLE: tuple[Rule, ...] = (
    Rule("transformer.wte.weight", "embed/embedding"),
    Rule("transformer.wpe.weight", "pos_embed/embedding"),
    *_layer_norm(f"{_GPT2_LAYER}.ln_1", "layers_{i}/attn_norm"),
    *_linear(f"{_GPT2_LAYER}.attn.c_attn", "layers_{i}/attn/qkv", transpose=False),
    *_linear(f"{_GPT2_LAYER}.attn.c_proj", "layers_{i}/attn/o", transpose=False),
    *_layer_norm(f"{_GPT2_LAYER}.ln_2", "layers_{i}/mlp_norm"),
    *_linear(f"{_GPT2_LAYER}.mlp.c_fc", "layers_{i}/mlp/up", transpose=False),
    *_linear(f"{_GPT2_LAYER}.mlp.c_proj", "layers_{i}/mlp/down", transpose=False),
    *_layer_norm("transformer.ln_f", "final_norm"),
    Rule("lm_head.weight", "lm_head/kernel", True),
    Rule("score.weight", "score/kernel", True),
    Rule("score.weight", "value_head/kernel", True),
    Rule("score.bias", "score/bias"),  # config.head_bias: from value_head.safetensors (models/valuehead.py)
    Rule("score.bias", "value_head/bias"),
)


class Family(NamedTuple):
    table: tuple[Rule, ...]
    base_prefix: str  # prefix of trunk tensors, absent when a checkpoint was saved from the bare model
    ignored: str  # regex of HF tensors that are buffers, not weights


_FAMILIES = {
    "llama": Family(LLAMA_FAMILY_TABLE, "model.", r"rotary_emb\.inv_freq$"),
    "qwen2": Family(LLAMA_FAMILY_TABLE, "model.", r"rotary_emb\.inv_freq$"),
    "qwen3": Family(LLAMA_FAMILY_TABLE, "model.", r"rotary_emb\.inv_freq$"),
    "gpt2": Family(GPT2_TABLE, "transformer.", r"\.attn\.(masked_)?bias$"),
}
_HEAD_TENSORS = ("lm_head.weight", "score.weight")


def _param_paths(model: DecoderModel) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def expand_table(model: DecoderModel) -> dict[str, Rule]:
    """Our params path -> the concrete rule (layer index filled in) for every parameter of `model`."""
    paths = _param_paths(model)
    rules: dict[str, Rule] = {}
    for rule in _FAMILIES[model.config.model_type].table:
        layers = range(model.config.num_layers) if "{i}" in rule.ours else (None,)
        for i in layers:
            concrete = Rule(rule.hf.replace("{i}", str(i)), rule.ours.replace("{i}", str(i)), rule.transpose)
            if concrete.ours in paths:
                rules[concrete.ours] = concrete
    uncovered = sorted(set(paths) - set(rules))
    if uncovered:  # a table bug, never a user error
        raise AssertionError(f"no HF rule for params {uncovered}")
    return rules


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get_path(tree: dict, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def read_config(path: str) -> ModelConfig:
    """`path/config.json` -> ModelConfig, with one-line errors for a missing or malformed file."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (load_pretrained reads local directories only)")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; a checkpoint directory needs config.json")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: malformed JSON ({err})") from None
    return from_hf_config(raw, config_path)


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it."""
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: malformed index, needs a 'weight_map' object ({err})") from None
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise CheckpointError(f"{index_path}: shard {os.path.basename(shard)} is missing")
        return files
    if os.path.isfile(single_path):
        with safe_open(single_path, framework="numpy") as f:
            return {name: single_path for name in f.keys()}
    pickles = sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{os.path.join(path, pickles[0])}: pickle checkpoints are never loaded (unsafe); convert it to "
            f"{WEIGHTS_FILE} first, e.g. transformers' save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} found")


def load_pretrained(path: str, *, head: str = "lm", dtype=jnp.float32, shardings=None) -> tuple[DecoderModel, dict]:
    """Reads a local HF directory -> `(model, params)`; params are cast to `dtype` (also the compute dtype).

    head="lm": ForCausalLM weights (tied models read the embedding). head="reward": ForSequenceClassification
    with one label (`score.weight`). head="value": a critic; its head starts from `score.weight` when the
    checkpoint has one (a reward model), else at zero. A LLaMA-Factory reward model (`value_head.safetensors`
    beside a causal LM) loads through `ppojax.models.valuehead` (head with a bias). Errors: `CheckpointError`,
    one line.
    shardings: a params-shaped tree of `jax.sharding.Sharding`s, or a function model -> such a tree (see
    `ppojax.parallel.load_sharded`): each tensor is then built shard by shard from slices of the file, straight
    on its devices, never whole on one device.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, found {head!r}")
    if head != "lm":
        from ppojax.models import valuehead  # imports this module

        if valuehead.is_valuehead_checkpoint(path):
            if valuehead.is_adapter_checkpoint(path):
                raise CheckpointError(
                    f"{path}: a LoRA reward adapter with a value head (LLaMA-Factory); load it with "
                    "ppojax.models.load_valuehead_checkpoint(path, base=<the model it was trained on>)"
                )
            return valuehead.load_valuehead_checkpoint(path, head=head, dtype=dtype, shardings=shardings)
    model = DecoderModel(read_config(path), head, dtype)
    return model, read_params(path, model, dtype=dtype, shardings=shardings)


def read_params(path: str, model: DecoderModel, *, dtype=jnp.float32, shardings=None, extra=None, deltas=None) -> dict:
    """The params of `model` read from the safetensors of the HF directory `path` (see `load_pretrained`).

    extra: HF tensor name -> array (HF layout) for tensors that live outside `path`'s weight files (a value head
    from `value_head.safetensors`); deltas: HF tensor name -> array added to that tensor as read (a LoRA
    adapter's `scale * B @ A`, HF layout). Both are used by `ppojax.models.valuehead`.
    """
    extra, deltas = dict(extra or {}), dict(deltas or {})
    config = model.config
    head = model.head
    family = _FAMILIES[config.model_type]
    files = _weight_files(path)
    names = {name: name for name in files if not re.search(family.ignored, name)}
    if names and not any(n.startswith(family.base_prefix) for n in names):
        names = {(n if n in _HEAD_TENSORS else family.base_prefix + n): n for n in names.values()}
    rules = expand_table(model)
    shapes = _param_paths(model)
    used = {rule.hf for rule in rules.values()}
    # Head tensors this head does not use (a critic from a causal LM, a tied copy of the embedding).
    tolerated = {"lm_head.weight"} - (used if head == "lm" else set())
    unexpected = sorted(set(names) - used - tolerated)
    unused_deltas = sorted(set(deltas) - used)
    if unused_deltas:
        raise CheckpointError(
            f"{path}: the adapter changes {unused_deltas[0]!r}, which a {config.model_type} {head} model does not have"
        )
    if unexpected:
        file = files[names[unexpected[0]]]
        raise CheckpointError(
            f"{file}: unexpected tensor {names[unexpected[0]]!r} for a {config.model_type} {head} model "
            f"({len(unexpected)} unexpected in all)"
        )
    params: dict = {}
    handles: dict = {}
    np_dtype = jnp.dtype(dtype)
    if callable(shardings):
        shardings = shardings(model)
    try:
        for ours, rule in rules.items():
            expected = shapes[ours][::-1] if rule.transpose else shapes[ours]
            if rule.hf in extra:
                tensor, what = extra[rule.hf], f"{path}: head tensor {rule.hf!r}"
            elif rule.hf in names:
                file = files[names[rule.hf]]
                if file not in handles:
                    handles[file] = safe_open(file, framework="numpy")
                # Sharded: a lazy slice, each device reads its block; else the whole tensor.
                read = handles[file].get_slice if shardings is not None else handles[file].get_tensor
                tensor, what = read(names[rule.hf]), f"{file}: tensor {names[rule.hf]!r}"
            elif ours.startswith("value_head/"):  # a critic from a causal LM: its head starts at zero
                tensor, what = np.zeros(expected, np_dtype), ours
            else:
                where = os.path.join(path, INDEX_FILE if INDEX_FILE in os.listdir(path) else WEIGHTS_FILE)
                raise CheckpointError(f"{where}: missing tensor {rule.hf!r} (expected shape {expected})")
            found = tuple(tensor.get_shape() if hasattr(tensor, "get_shape") else tensor.shape)
            if found != expected:
                hint = "; a reward checkpoint needs num_labels=1" if rule.hf == "score.weight" else ""
                raise CheckpointError(f"{what} has shape {found}, expected {expected}{hint}")
            if rule.hf in deltas:
                if tuple(deltas[rule.hf].shape) != found:
                    raise CheckpointError(
                        f"{path}: the adapter's update of {rule.hf!r} has shape {tuple(deltas[rule.hf].shape)}, "
                        f"the base tensor {found}"
                    )
                tensor = _Sum(tensor, deltas[rule.hf])
            if shardings is not None:
                sharding = _get_path(shardings, ours)
                _set_path(params, ours, _sharded_tensor(tensor, rule.transpose, shapes[ours], np_dtype, sharding))
                continue
            array = tensor.T if rule.transpose else tensor
            _set_path(params, ours, jnp.asarray(np.ascontiguousarray(array).astype(np_dtype)))
    finally:
        handles.clear()
    return params


class _Sum:
    """A base tensor (array or safetensors slice) plus an update, summed in float32 when read (`[index]`,
    `np.asarray`, `.T`)."""

    def __init__(self, tensor, delta: np.ndarray):
        self.tensor, self.delta = tensor, delta
        self.shape = tuple(delta.shape)

    def get_shape(self):
        return self.shape

    def __getitem__(self, index):
        return np.asarray(self.tensor[index]).astype(np.float32) + self.delta[index].astype(np.float32)

    def __array__(self, dtype=None, copy=None):
        full = self[tuple(slice(None) for _ in self.shape)]
        return full if dtype is None else full.astype(dtype)

    @property
    def T(self):
        return np.asarray(self).T


def _sharded_tensor(tensor_slice, transpose: bool, shape, dtype, sharding) -> jax.Array:
    """A jax.Array of our `shape` built per device from slices of a safetensors tensor (HF layout)."""

    def block(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if transpose:
            return np.ascontiguousarray(tensor_slice[index[::-1]].T).astype(dtype)
        return np.ascontiguousarray(tensor_slice[index]).astype(dtype)

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def save_pretrained(path: str, model: DecoderModel, params: dict, tokenizer=None, *, lora=None) -> None:
    """Writes `config.json` + `model.safetensors` (params' own dtype) that transformers loads as
    `AutoModelForCausalLM` (head="lm") or `AutoModelForSequenceClassification` with one label (head="value"
    or "reward"; with `config.head_bias`, LLaMA-Factory's causal LM + `value_head.safetensors` instead). LoRA
    adapters, if given, are merged first. A tokenizer, if given, is saved beside it."""
    if lora is not None:
        params = merge_lora(model, params, lora)
    if model.head != "lm" and model.config.head_bias:  # transformers' score has no bias: LLaMA-Factory's layout
        from ppojax.models import valuehead

        valuehead.save_valuehead_checkpoint(path, model, params, tokenizer)
        return
    os.makedirs(path, exist_ok=True)
    tensors = {}
    dtypes = set()
    for ours, rule in expand_table(model).items():
        array = np.asarray(_get_path(params, ours))
        dtypes.add(array.dtype.name)
        tensors[rule.hf] = np.ascontiguousarray(array.T if rule.transpose else array)
    hf_config = to_hf_config(model.config, model.head)
    hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    stale_index = os.path.join(path, INDEX_FILE)
    if os.path.exists(stale_index):  # it would take precedence over the file just written
        os.remove(stale_index)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
