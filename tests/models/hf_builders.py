"""Tiny random Hugging Face checkpoints built offline with transformers + torch (test-only)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

PAD_ID = 0

# name -> (config class, kwargs). Small shapes; every family feature the loader must map is switched on
# somewhere: GQA, explicit head_dim != hidden / heads, biases, tied and untied heads, each rope type.
CONFIGS = {
    "llama3": (
        transformers.LlamaConfig,
        dict(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "llama_linear": (
        transformers.LlamaConfig,
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            max_position_embeddings=1024,
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),
    ),
    "llama_dynamic": (
        transformers.LlamaConfig,
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_scaling=dict(rope_type="dynamic", factor=2.0),
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            vocab_size=150,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rope_theta=1e6,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            vocab_size=140,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
        ),
    ),
    "gpt2": (
        transformers.GPT2Config,
        dict(vocab_size=130, n_embd=32, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2),
    ),
    # GPT-2 variants: per-layer attention scaling, exact GELU, explicit n_inner.
    "gpt2_variant": (
        transformers.GPT2Config,
        dict(
            vocab_size=100,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=48,
            n_positions=600,
            scale_attn_by_inverse_layer_idx=True,
            activation_function="gelu",
        ),
    ),
}

CAUSAL_LM = {
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
    transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
    transformers.GPT2Config: transformers.GPT2LMHeadModel,
}
SEQUENCE_CLASSIFICATION = {
    transformers.LlamaConfig: transformers.LlamaForSequenceClassification,
    transformers.Qwen2Config: transformers.Qwen2ForSequenceClassification,
    transformers.Qwen3Config: transformers.Qwen3ForSequenceClassification,
    transformers.GPT2Config: transformers.GPT2ForSequenceClassification,
}


def make_config(name: str, *, pad_token_id=PAD_ID, **overrides):
    config_class, kwargs = CONFIGS[name]
    return config_class(**{**kwargs, "pad_token_id": pad_token_id, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight, bias and norm gets O(0.1) random values, so a mis-mapped tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm else 0.08 * noise)
    return model.eval()


def build(name: str, directory, *, head: str = "lm", seed: int = 0, dtype=torch.float32, **config_overrides):
    """Builds, randomises and saves a checkpoint; returns the torch model (fp32, eval mode)."""
    config = make_config(name, **config_overrides)
    if head == "lm":
        model = CAUSAL_LM[type(config)](config)
    else:
        config.num_labels = 1
        model = SEQUENCE_CLASSIFICATION[type(config)](config)
    randomize_(model, seed)
    model.to(dtype).save_pretrained(directory)
    return model.to(torch.float32)


def padded_batch(lengths, total: int, vocab: int, *, side: str = "left", seed: int = 0):
    """ids, mask `[B, total]` int64 numpy; real tokens in [1, vocab), pad id 0 on `side`."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), total), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, length in enumerate(lengths):
        cols = slice(total - length, total) if side == "left" else slice(0, length)
        ids[row, cols] = rng.integers(1, vocab, length)
        mask[row, cols] = 1
    return ids, mask


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """HF position ids from the mask, as generate() / TRL build them for left-padded input."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def torch_forward(model, ids, mask, *, positions: bool = True):
    kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if positions:
        kwargs["position_ids"] = torch.from_numpy(mask_positions(mask))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def _apply(model, params, ids, mask, lora=None):
    return model.apply(params, ids, mask, lora=lora)


# One jitted entry point for the tests; the model definition is the static argument.
jit_apply = __import__("jax").jit(_apply, static_argnums=0)
