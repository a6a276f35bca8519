"""PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`, as PEFT's `save_pretrained` writes
them and LLaMA-Factory's LoRA stages leave them), read without torch or peft.

PEFT stores `base_model.model.<module>.lora_A.weight [r, in]` and `.lora_B.weight [out, r]`; the adapted weight is
`W + scale · B A` with scale = lora_alpha / r (lora_alpha / √r with `use_rslora`; `alpha_pattern` per module, matched
as PEFT matches it), for GPT-2's `Conv1D` (`fan_in_fan_out`) the transpose. `modules_to_save` tensors are saved
whole, as `base_model.model.<name>.weight`. An adapter is used two ways:

- merged into the weights as they are read (`merged_updates`, `load_with_adapters`: `ppojax.models.hf.read_params`
  adds the updates per tensor or per shard, in float32);
- resumed as ppojax's own `Lora` pytree (`adapter_as_lora`: a = Aᵀ, b = Bᵀ, one scale), as LLaMA-Factory resumes
  the last of its `adapter_name_or_path` adapters when it trains LoRA again.

DoRA, LoRA biases, layer replication, token-index adapters and embedding LoRA are refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from ppojax.models import hf
from ppojax.models.config import CheckpointError
from ppojax.models.decoder import DecoderModel
from ppojax.models.lora import Lora

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# adapter_config.json options that change what the adapter computes and that this reader does not implement.
_UNSUPPORTED_ADAPTER_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "target_parameters",
}


def is_adapter_checkpoint(path: str) -> bool:
    """Whether `path` holds a PEFT adapter (`adapter_config.json`)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE))


def safetensors_file(path: str, name: str, pickle_name: str, missing: str, save_hint: str) -> str:
    """`path/name`, or a one-line error: the pickle `pickle_name` is refused, a missing file is `missing`."""
    file = os.path.join(path, name)
    if os.path.isfile(file):
        return file
    pickled = os.path.join(path, pickle_name)
    if os.path.isfile(pickled):
        raise CheckpointError(f"{pickled}: pickle checkpoints are never loaded (unsafe); {save_hint}")
    raise CheckpointError(missing)


def adapter_config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG_FILE)
    try:
        with open(file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: malformed JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    for key, what in _UNSUPPORTED_ADAPTER_OPTIONS.items():
        if config.get(key):
            raise CheckpointError(f"{file}: {what} is not supported; merge the adapter into the model first")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{file}: key {key!r} must be a positive number, found {config.get(key)!r}")
    return config


def _alpha(config: dict, module: str) -> float:
    """lora_alpha for `module`, honouring PEFT's `alpha_pattern` (a key matches a module name's suffix)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


class Adapter(NamedTuple):
    """One PEFT adapter, read: `factors` HF tensor name (`<module>.weight`) -> (A [r, in], B [out, r], scale),
    float32; `replacements` HF tensor name -> a whole `modules_to_save` tensor."""

    factors: dict
    replacements: dict


def read_adapter(path: str, model: DecoderModel) -> Adapter:
    """A PEFT LoRA adapter directory, checked against `model`'s tensors. One-line `CheckpointError`s."""
    config = adapter_config(path)
    file = safetensors_file(
        path,
        ADAPTER_WEIGHTS_FILE,
        "adapter_model.bin",
        f"{path}: {ADAPTER_CONFIG_FILE} but no {ADAPTER_WEIGHTS_FILE}",
        "save the adapter as safetensors",
    )
    rules = {rule.hf: rule for rule in hf.expand_table(model).values()}
    with safe_open(file, framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    factors: dict = {}
    replacements: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if not name.startswith(_PEFT_PREFIX):
            raise CheckpointError(f"{file}: unexpected tensor {name!r} (PEFT names start with {_PEFT_PREFIX!r})")
        inner = name[len(_PEFT_PREFIX) :]
        match = _LORA_KEY.match(inner)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
        elif inner in rules:  # modules_to_save: the whole tensor, trained
            replacements[inner] = tensor
        else:
            raise CheckpointError(
                f"{file}: tensor {name!r} is not a LoRA factor of a {model.config.model_type} projection "
                "(embedding or other adapters are not supported)"
            )
    for module, parts in sorted(pairs.items()):
        target = f"{module}.weight"
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{file}: {module} has lora_{''.join(parts)} but not both lora_A and lora_B")
        if target not in rules or rules[target].ours.split("/")[-1] != "kernel":
            raise CheckpointError(f"{file}: LoRA on {module!r}, not a projection of a {model.config.model_type} model")
        a, b = parts["A"].astype(np.float32), parts["B"].astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{file}: {module} lora_A {a.shape} and lora_B {b.shape} do not chain (rank mismatch)"
            )
        rank = a.shape[0]
        factors[target] = (a, b, _alpha(config, module) / (np.sqrt(rank) if config.get("use_rslora") else rank))
    overlap = sorted(set(factors) & set(replacements))
    if overlap:
        raise CheckpointError(f"{file}: {overlap[0]!r} is both LoRA-adapted and saved whole (modules_to_save)")
    return Adapter(factors, replacements)


def merged_updates(paths, model: DecoderModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PEFT LoRA adapter directories, merged one after the other (PEFT's `merge_and_unload` in turn) ->
    `(deltas, replacements)`, both HF tensor name -> array in the HF layout: `deltas` are added to the base tensor
    (`scale * B @ A` for a `Linear`, `[out, in]`; its transpose for GPT-2's `Conv1D`, `[in, out]`; the adapters'
    deltas add up), `replacements` (PEFT `modules_to_save`) replace it (a later one an earlier one). A tensor
    replaced by one adapter and adapted by another is refused (its merge order would matter)."""
    rules = {rule.hf: rule for rule in hf.expand_table(model).values()}
    deltas: dict[str, np.ndarray] = {}
    replacements: dict[str, np.ndarray] = {}
    for path in paths:
        adapter = read_adapter(path, model)
        for target, (a, b, scale) in adapter.factors.items():
            delta = scale * (b @ a)  # [out, in], torch Linear's layout
            delta = delta if rules[target].transpose else delta.T  # GPT-2 Conv1D stores [in, out]
            deltas[target] = deltas[target] + delta if target in deltas else delta
        replacements.update(adapter.replacements)
    clash = sorted(set(deltas) & set(replacements))
    if clash:
        raise CheckpointError(
            f"{paths[-1]}: {clash[0]!r} is replaced by one adapter (modules_to_save) and adapted by another; "
            "merge them with PEFT first"
        )
    return deltas, replacements


def load_with_adapters(path: str, adapters, *, head: str = "lm", dtype=jnp.float32, shardings=None):
    """`ppojax.models.load_pretrained(path, head=...)` with the PEFT adapters `adapters` (directories, in order)
    merged into the weights as they are read (none: `load_pretrained` itself). -> (model, params)."""
    if not adapters:
        return hf.load_pretrained(path, head=head, dtype=dtype, shardings=shardings)
    model = DecoderModel(hf.read_config(path), head, dtype)
    deltas, replacements = merged_updates(list(adapters), model)
    return model, hf.read_params(path, model, dtype=dtype, shardings=shardings, extra=replacements, deltas=deltas)


def adapter_as_lora(path: str, model: DecoderModel) -> Lora:
    """A PEFT adapter as ppojax's `Lora` (float32): a = Aᵀ [in, r], b = Bᵀ [r, out] for every adapted projection
    (`W + scale · a b` is PEFT's update in ppojax's [in, out] layout, `Conv1D` included), to keep training it.
    Needs one scale for all modules and no `modules_to_save` (merge such an adapter instead)."""
    adapter = read_adapter(path, model)
    if adapter.replacements:
        raise CheckpointError(
            f"{path}: the adapter also trains whole tensors (modules_to_save: {sorted(adapter.replacements)[0]!r}); "
            "ppojax's LoRA cannot keep training them: merge it (create_new_adapter: true)"
        )
    if not adapter.factors:
        raise CheckpointError(f"{path}: the adapter has no LoRA factors")
    scales = {round(float(scale), 12) for _, _, scale in adapter.factors.values()}
    if len(scales) != 1:
        raise CheckpointError(
            f"{path}: the adapter's modules have different scales {sorted(scales)} (rank_pattern / alpha_pattern); "
            "ppojax's LoRA has one: merge it (create_new_adapter: true)"
        )
    ours = {rule.hf: path_ for path_, rule in hf.expand_table(model).items()}
    adapters: dict = {}
    for target, (a, b, _) in adapter.factors.items():
        *modules, _kernel = ours[target].split("/")
        node = adapters
        for name in modules[:-1]:
            node = node.setdefault(name, {})
        node[modules[-1]] = {"a": jnp.asarray(a.T), "b": jnp.asarray(b.T)}
    return Lora(adapters=adapters, scale=float(next(iter(adapter.factors.values()))[2]))
