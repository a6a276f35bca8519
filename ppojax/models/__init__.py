"""Flax (linen) decoders for the Llama, Qwen2, Qwen3 and GPT-2 families with LM, value and reward heads,
an explicit KV cache, LoRA, and torch-free import / export of Hugging Face checkpoints (and of LLaMA-Factory's
value-head reward models, full or LoRA)."""

from ppojax.models.config import SUPPORTED_MODEL_TYPES, CheckpointError, ModelConfig, from_hf_config, to_hf_config
from ppojax.models.decoder import (
    HEADS,
    DecoderModel,
    KVCache,
    ModelOutput,
    init_params,
    init_value_head,
    positions_from_mask,
    score_index,
    sequence_scores,
    values_from_hidden,
)
from ppojax.models.hf import load_pretrained, read_config, save_pretrained
from ppojax.models.lora import ALL_TARGETS, Lora, init_lora, merge_lora
from ppojax.models.valuehead import (
    is_valuehead_checkpoint,
    load_reward_model,
    load_valuehead_checkpoint,
    save_valuehead_checkpoint,
)

__all__ = [
    "ALL_TARGETS",
    "HEADS",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "DecoderModel",
    "KVCache",
    "Lora",
    "ModelConfig",
    "ModelOutput",
    "from_hf_config",
    "init_lora",
    "init_params",
    "init_value_head",
    "is_valuehead_checkpoint",
    "load_pretrained",
    "load_reward_model",
    "load_valuehead_checkpoint",
    "merge_lora",
    "positions_from_mask",
    "read_config",
    "save_pretrained",
    "save_valuehead_checkpoint",
    "score_index",
    "sequence_scores",
    "to_hf_config",
    "values_from_hidden",
]
