"""The tiny HF model directories the command-line tests train on (one shape, so their compilations match)."""

import jax

from ppojax.models import DecoderModel, ModelConfig, init_params, save_pretrained


def tiny_config(tokenizer, *, model_type: str = "llama", max_position_embeddings: int = 256) -> ModelConfig:
    """Hidden 16, one layer, 2 heads / 1 KV head, tied embeddings; qwen2 gets its q/k/v biases."""
    return ModelConfig(
        model_type=model_type,
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=max_position_embeddings,
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=True,
        eos_token_ids=(tokenizer.eos_token_id,),
    )


def save_tiny_model(directory, tokenizer, *, head: str = "lm", seed: int = 0, **config_keys):
    """Random weights (PRNGKey(seed)) saved with the tokenizer as an HF directory; returns (model, params)."""
    model = DecoderModel(tiny_config(tokenizer, **config_keys), head=head)
    params = init_params(model, jax.random.PRNGKey(seed))
    save_pretrained(str(directory), model, params, tokenizer)
    return model, params
