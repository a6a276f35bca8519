"""`ModelConfig`: one frozen, hashable description of every supported decoder family.

The families differ only in the fields below (norm kind, MLP kind, positions, biases, q/k norm, fused
q/k/v); `from_hf_config` reads a raw Hugging Face `config.json` dict into it and `to_hf_config` writes one
back. The raw dict is read, never `transformers.AutoConfig`, so loading needs neither torch nor the
transformers config classes, and both the transformers-4 (`rope_theta`, `rope_scaling`) and
transformers-5 (`rope_parameters`) spellings are accepted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gpt2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Activations by their transformers name; both GELU-tanh spellings are the same function.
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu")


class CheckpointError(ValueError):
    """A checkpoint directory or config cannot be read; the message is one line naming file and key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder. Frozen and hashable: usable as (part of) a static jit argument.

    `hf_config_json` keeps the original `config.json` text (sorted keys) so an export preserves the keys
    this class does not model (chat-template ids, `layer_types`, ...). It is `""` for configs built here.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" (RMSNorm, weight only) | "layer" (LayerNorm, weight and bias)
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)) if True, else down(act(up(x)))
    position: str = "rope"  # "rope" | "learned"
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    fused_qkv: bool = False  # one (H, 3H) q/k/v projection (GPT-2 `c_attn`)
    attn_scale_by_layer: bool = False  # GPT-2 `scale_attn_by_inverse_layer_idx`
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A bias on the scalar (value / reward) head: TRL's and LLaMA-Factory's `v_head.summary` has one
    # (`value_head.safetensors`, see `ppojax.models.valuehead`); transformers' `score` does not.
    head_bias: bool = False
    hf_config_json: str = dataclasses.field(default="", repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise CheckpointError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.activation not in ACTIVATIONS:
            raise CheckpointError(f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (what a single-id caller wants); all of them are in `eos_token_ids`."""
        return self.eos_token_ids[0] if self.eos_token_ids else None


def as_id_tuple(value) -> tuple[int, ...]:
    """A config's token id field (None, an id or a list of ids) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class _Reader:
    """Typed access to the raw config dict with one-line errors naming the file and key."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, key, default=None, *, aliases=()):
        for name in (key, *aliases):
            if name in self.raw and self.raw[name] is not None:
                return self.raw[name]
        return default

    def require(self, key, *, aliases=()):
        value = self.get(key, aliases=aliases)
        if value is None:
            raise CheckpointError(f"{self.source}: required key {key!r} is missing or null")
        return value

    def integer(self, key, default=None, *, aliases=()):
        value = self.require(key, aliases=aliases) if default is None else self.get(key, default, aliases=aliases)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{self.source}: key {key!r} must be an integer, found {value!r}")
        return value


def _rope_fields(reader: _Reader, default_theta: float) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta inside); transformers 4 wrote `rope_theta` and an
    # optional `rope_scaling` dict whose type key was `rope_type` or, older still, `type`.
    params = dict(reader.get("rope_parameters") or {})
    scaling = reader.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", reader.get("rope_theta", default_theta))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{reader.source}: unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{reader.source}: partial_rotary_factor != 1 is not supported")
    fields = {"rope_type": rope_type, "rope_theta": float(theta)}
    if rope_type != "default":
        if "factor" not in merged:
            raise CheckpointError(f"{reader.source}: rope_type {rope_type!r} needs key 'factor' in rope_parameters")
        fields["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise CheckpointError(f"{reader.source}: rope_type 'llama3' needs key {key!r} in rope_parameters")
        fields["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        fields["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        fields["rope_original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return fields


def from_hf_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Reads a raw `config.json` dict. Defaults are those of the transformers 5.23 config classes."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    reader = _Reader(raw, source)
    model_type = reader.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    common = dict(
        model_type=model_type,
        vocab_size=reader.integer("vocab_size"),
        pad_token_id=reader.get("pad_token_id"),
        bos_token_id=reader.get("bos_token_id"),
        eos_token_ids=as_id_tuple(reader.get("eos_token_id")),
        hf_config_json=json.dumps(raw, sort_keys=True),
    )
    if model_type == "gpt2":
        hidden = reader.integer("n_embd", aliases=("hidden_size",))
        heads = reader.integer("n_head", aliases=("num_attention_heads",))
        if hidden % heads:
            raise CheckpointError(f"{source}: n_embd={hidden} is not a multiple of n_head={heads}")
        if reader.get("add_cross_attention", False):
            raise CheckpointError(f"{source}: add_cross_attention=true is not supported")
        return ModelConfig(
            **common,
            hidden_size=hidden,
            intermediate_size=reader.integer("n_inner", 4 * hidden),
            num_layers=reader.integer("n_layer", aliases=("num_hidden_layers",)),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=reader.integer("n_positions", 1024, aliases=("max_position_embeddings",)),
            norm="layer",
            norm_eps=float(reader.get("layer_norm_epsilon", 1e-5)),
            activation=reader.get("activation_function", "gelu_new"),
            gated_mlp=False,
            position="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            fused_qkv=True,
            attn_scale_by_layer=bool(reader.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(reader.get("tie_word_embeddings", True)),
        )
    if not reader.get("scale_attn_weights", True):
        raise CheckpointError(f"{source}: scale_attn_weights=false is not supported")
    if reader.get("use_sliding_window", False):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    hidden = reader.integer("hidden_size")
    heads = reader.integer("num_attention_heads")
    # Qwen3's config class defaults head_dim to 128; Llama and Qwen2 derive it from hidden / heads.
    default_head_dim = 128 if model_type == "qwen3" else hidden // heads
    attention_bias = bool(reader.get("attention_bias", False))
    return ModelConfig(
        **common,
        hidden_size=hidden,
        intermediate_size=reader.integer("intermediate_size"),
        num_layers=reader.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=reader.integer("num_key_value_heads", heads),
        head_dim=reader.integer("head_dim", default_head_dim),
        max_position_embeddings=reader.integer("max_position_embeddings", 2048 if model_type == "llama" else 32768),
        norm="rms",
        norm_eps=float(reader.get("rms_norm_eps", 1e-6)),
        activation=reader.get("hidden_act", "silu"),
        gated_mlp=True,
        position="rope",
        **_rope_fields(reader, 10000.0),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(reader.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(reader.get("tie_word_embeddings", False)),
    )


def _id_or_list(ids: tuple[int, ...]):
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


_ARCHITECTURE_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT2"}


def to_hf_config(config: ModelConfig, head: str) -> dict:
    """The `config.json` dict transformers needs to rebuild this model (ForCausalLM or, for a value or
    reward head, ForSequenceClassification with one label). Keys of the original file are kept."""
    raw = json.loads(config.hf_config_json) if config.hf_config_json else {}
    for stale in ("rope_scaling", "rope_theta", "num_labels", "id2label", "label2id", "torch_dtype"):
        raw.pop(stale, None)
    prefix = _ARCHITECTURE_NAMES[config.model_type]
    suffix = "LMHeadModel" if config.model_type == "gpt2" else "ForCausalLM"
    raw.update(
        model_type=config.model_type,
        architectures=[prefix + (suffix if head == "lm" else "ForSequenceClassification")],
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=_id_or_list(config.eos_token_ids),
    )
    if head != "lm":
        raw.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if config.model_type == "gpt2":
        raw.update(
            n_embd=config.hidden_size,
            n_inner=config.intermediate_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function=config.activation,
            scale_attn_by_inverse_layer_idx=config.attn_scale_by_layer,
        )
        return raw
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type != "default":
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_position_embeddings,
        )
    raw.update(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        hidden_act=config.activation,
        rope_parameters=rope,
    )
    if config.model_type in ("llama", "qwen3"):
        raw["attention_bias"] = config.qkv_bias
    if config.model_type == "llama":
        raw["mlp_bias"] = config.mlp_bias
    return raw
