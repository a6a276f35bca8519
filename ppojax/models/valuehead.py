"""Value-head checkpoints as LLaMA-Factory (and TRL 0.x's `AutoModelForCausalLMWithValueHead`) write them.

LLaMA-Factory's `stage: rm` saves a reward model as a causal LM plus `value_head.safetensors`, TRL's
`v_head.summary` linear layer on the final norm's output: `v_head.summary.weight [1, H]` and
`v_head.summary.bias [1]`. Two layouts:

- full fine-tuning: `config.json` + `model.safetensors` (the causal LM, `lm_head` included or not) +
  `value_head.safetensors`;
- LoRA (LLaMA-Factory's default `reward_model_type: lora`): a PEFT adapter (`adapter_config.json`,
  `adapter_model.safetensors`) + `value_head.safetensors`. LLaMA-Factory applies the adapter to the base model
  the policy starts from, so `load_valuehead_checkpoint` takes that base (`base=`) and merges the adapter into
  it as it reads it (W + scale · B A, scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`;
  `alpha_pattern` honoured; `modules_to_save` tensors replace the base's).

The result is a `DecoderModel` whose config has `head_bias=True`: the same trunk, and the head `{kernel, bias}`.
The reward is read at the last real token, LLaMA-Factory's rule (`attention_mask.sum(-1) - 1` on its
right-padded scoring batch) and `ppojax.sequence_reward`'s. `save_valuehead_checkpoint` writes the full layout
back (what `ppojax.models.save_pretrained` does for a model with `head_bias`), which LLaMA-Factory reads as a
`reward_model_type: full` reward model and ppojax reads with `load_valuehead_checkpoint`.

Only safetensors are read: `value_head.bin` and `adapter_model.bin` (pickles) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ppojax.models import hf
from ppojax.models.config import CheckpointError, to_hf_config
from ppojax.models.decoder import DecoderModel
from ppojax.models.peft_adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    is_adapter_checkpoint,
    merged_updates,
    safetensors_file,
)

VALUE_HEAD_FILE = "value_head.safetensors"
_HEAD_KEYS = {"v_head.summary.weight": "score.weight", "v_head.summary.bias": "score.bias"}


def is_valuehead_checkpoint(path: str) -> bool:
    """Whether `path` is a directory with a value head file (`value_head.safetensors`, or the pickle
    `value_head.bin`, which `load_valuehead_checkpoint` refuses with its own message)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in (VALUE_HEAD_FILE, "value_head.bin")
    )


def read_value_head(path: str) -> dict[str, np.ndarray]:
    """`path/value_head.safetensors` -> `{"score.weight": [1, H], "score.bias": [1]}` (HF layout, float32)."""
    file = safetensors_file(
        path,
        VALUE_HEAD_FILE,
        "value_head.bin",
        f"{path}: no {VALUE_HEAD_FILE}",
        f"save the value head as {VALUE_HEAD_FILE} (LLaMA-Factory: save_safetensors: true, its default)",
    )
    with safe_open(file, framework="numpy") as f:
        found = {name: f.get_tensor(name) for name in f.keys()}
    missing = sorted(set(_HEAD_KEYS) - set(found))
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0]!r}; found {sorted(found)}")
    extra = sorted(set(found) - set(_HEAD_KEYS))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r}; a value head has {sorted(_HEAD_KEYS)}")
    weight, bias = found["v_head.summary.weight"], found["v_head.summary.bias"]
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise CheckpointError(
            f"{file}: v_head.summary.weight {weight.shape} and bias {bias.shape}, expected [1, hidden] and [1] "
            "(a reward head with one output)"
        )
    return {"score.weight": weight.astype(np.float32), "score.bias": bias.astype(np.float32)}


def load_valuehead_checkpoint(
    path: str,
    *,
    head: str = "reward",
    base: str | None = None,
    base_adapters=(),
    dtype=jnp.float32,
    shardings=None,
) -> tuple[DecoderModel, dict]:
    """A LLaMA-Factory value-head reward model directory -> `(model, params)` with `model.config.head_bias`.

    head: "reward" (the reward model) or "value" (a critic initialised from it). base: the HF directory of the
    model a LoRA reward adapter was trained on (LLaMA-Factory applies it to the policy's base model); required
    for a LoRA directory, refused for a full one. base_adapters: PEFT adapters merged into `base` first (LLaMA-Factory
    applies the reward adapter to the policy's model with its merged adapters). shardings: as `load_pretrained`.
    Errors: `CheckpointError`, one line naming the file and tensor.
    """
    if head not in ("reward", "value"):
        raise ValueError(f"a value-head checkpoint loads as head 'reward' or 'value', found {head!r}")
    head_tensors = read_value_head(path)
    if is_adapter_checkpoint(path):
        if base is None:
            raise CheckpointError(
                f"{path}: a LoRA reward model ({ADAPTER_CONFIG_FILE}); pass the base model it was trained on "
                "(base=; ppojax eval-rm --base; in a PPO config the policy's model_name_or_path is used)"
            )
        trunk = base
    else:
        if base is not None:
            raise CheckpointError(f"{path}: a full reward model (no {ADAPTER_CONFIG_FILE}); base= is only for adapters")
        trunk = path
    config = dataclasses.replace(hf.read_config(trunk), head_bias=True)
    if head_tensors["score.weight"].shape[1] != config.hidden_size:
        raise CheckpointError(
            f"{os.path.join(path, VALUE_HEAD_FILE)}: v_head.summary.weight has {head_tensors['score.weight'].shape[1]} "
            f"inputs, the model {trunk} has hidden_size {config.hidden_size}"
        )
    model = DecoderModel(config, head, dtype)
    deltas, replacements = merged_updates([*base_adapters, path], model) if trunk is base else ({}, {})
    extra = {**replacements, **head_tensors}
    params = hf.read_params(trunk, model, dtype=dtype, shardings=shardings, extra=extra, deltas=deltas)
    return model, params


def load_reward_model(
    path: str,
    *,
    head: str = "reward",
    base: str | None = None,
    base_adapters=(),
    dtype=jnp.float32,
    shardings=None,
) -> tuple[DecoderModel, dict]:
    """Any reward model directory ppojax reads, as head "reward" (or "value": a critic from it): a Hugging Face
    sequence classifier (a ppojax `stage: rm` output_dir) or a LLaMA-Factory value-head model, full or LoRA (the
    adapter applied to `base`, which is ignored for the other layouts)."""
    if is_valuehead_checkpoint(path) and is_adapter_checkpoint(path):
        return load_valuehead_checkpoint(
            path, head=head, base=base, base_adapters=base_adapters, dtype=dtype, shardings=shardings
        )
    return hf.load_pretrained(path, head=head, dtype=dtype, shardings=shardings)  # a full value-head model too


def save_valuehead_checkpoint(path: str, model: DecoderModel, params: dict, tokenizer=None) -> None:
    """Writes the full layout LLaMA-Factory reads: `config.json` (the causal LM's), `model.safetensors` (the
    trunk; no `lm_head`: transformers initialises an untied one, which a reward model does not use) and
    `value_head.safetensors` (`v_head.summary.weight [1, H]`, `v_head.summary.bias [1]`)."""
    if model.head not in ("reward", "value") or not model.config.head_bias:
        raise ValueError(
            f"save_valuehead_checkpoint needs a reward or value model with head_bias, found {model.head!r}"
        )
    os.makedirs(path, exist_ok=True)
    tensors, head = {}, {}
    head_name = "score" if model.head == "reward" else "value_head"
    for ours, rule in hf.expand_table(model).items():
        array = np.asarray(hf._get_path(params, ours))
        array = np.ascontiguousarray(array.T if rule.transpose else array)
        if ours.startswith(f"{head_name}/"):
            head[rule.hf.replace("score.", "v_head.summary.", 1)] = array  # score.weight [1, H], score.bias [1]
        else:
            tensors[rule.hf] = array
    dtypes = {array.dtype.name for array in tensors.values()}
    hf_config = to_hf_config(dataclasses.replace(model.config, head_bias=False), "lm")
    hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    with open(os.path.join(path, hf.CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, hf.WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(head, os.path.join(path, VALUE_HEAD_FILE), metadata={"format": "pt"})
    for stale in (hf.INDEX_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):  # would be read before these files
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
