"""A byte-level BPE tokenizer trained on the review corpus with the `tokenizers` library (the Qwen2 tokenizer's
kind, so `AutoTokenizer` next to a Qwen2 config loads it unchanged), saved as a Hugging Face tokenizer directory
with a dedicated pad token (never the EOS) and a chat template.

Every word of the language becomes one token, with its leading space (" good") inside a text and without it
at the start ("the"). A response continues its opening, so response texts start with a space.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)  # ids 0 and 1
# The user turn is the review opening as raw text; an assistant turn continues it (its text starts with a
# space) and ends with EOS. So the templated prompt is exactly the opening, as with `template: none`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}" + EOS_TOKEN + "{% endif %}{% endfor %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A `transformers.PreTrainedTokenizerFast` trained on `texts` (pad id 0, EOS id 1). `vocab_size` is an
    upper bound: training stops when every word is one token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
