"""Datasets for `ppojax train`: reading, chat templates, validation, the pad token, and resumable batching.

Files are JSON (one array of records) or JSONL (one record per line). Record formats:

  ppo prompts:  {"instruction", "input"?, "system"?} (alpaca) | {"prompt", "system"?} |
                {"messages": [{"role", "content"}, ...]} | {"conversations": [{"from", "value"}, ...]} (sharegpt).
                A trailing assistant turn (and any "output") is ignored: PPO samples its own responses.
  rm pairs:     {"prompt" | "instruction" + "input" | "messages", "chosen", "rejected"}
  sft:          {"instruction", "input"?, "output"} | {"prompt", "response" | "output"} | {"messages": [..., assistant]}

alpaca's instruction and input are joined with a newline (LLaMA-Factory's rule). With a chat template the prompt
is the user turn(s) rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True)` (jinja2, the
template shipped in the model's tokenizer files; no remote code). With `template: none` (or default / empty /
raw) the prompt is the raw text. A response (chosen, rejected, SFT output) is its text's tokens plus the EOS id.

A dataset may also be LLaMA-Factory dataset_info.json entries (`ppojax.dataset_info`): the loaders take those in
place of a path (`read_dataset`), their records converted to the formats above.

Every problem is a `DataError` (a `ConfigError`): one line with the file and the line (JSONL) or record index
(JSON array).

Shapes: prompts come from `ppojax.generation.pad_prompts`: ids, mask [B, P] int32, LEFT-padded with P a multiple
of the bucket; responses (sft targets, rm chosen / rejected) are RIGHT-padded [B, N], N a multiple of the bucket.
Batches are drawn from a per-epoch permutation of (seed, epoch); `DataPosition(epoch, offset)` resumes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ppojax.config import ConfigError, RAW_TEMPLATES
from ppojax.generation import pad_prompts

PAD_TOKEN = "<|ppojax_pad|>"
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


class DataError(ConfigError):
    """A bad data file or record; one line naming the file and the line or record."""


# ----------------------------------------------------------------------------------------------------------
# Reading records


def read_records(path: str) -> list[tuple[str, dict]]:
    """[(where, record)] with `where` = "file:LINE" (JSONL) or "file record I" (JSON array, 0-based)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a JSON array or JSON lines of records")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        records = [(f"{path} record {i}", r) for i, r in enumerate(data)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg}, column {e.colno})") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_dataset(source, max_samples: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """(where, record) of a dataset: a file (`read_records`), or LLaMA-Factory dataset_info.json entries
    (`ppojax.dataset_info.resolve`; their records converted to ppojax's formats). max_samples: the first that many
    records (of each named dataset, as LLaMA-Factory)."""
    if isinstance(source, (str, os.PathLike)):
        return itertools.islice(read_records(os.fspath(source)), max_samples)
    from ppojax import dataset_info

    return dataset_info.read(tuple(source), max_samples)


def _text(record: dict, key: str, where: str, *, required: bool = True) -> Optional[str]:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return None
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # {"role": ..., "content": ...}
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, found {type(value).__name__}")
    return value


def _messages(record: dict, where: str) -> list[dict]:
    key = "messages" if "messages" in record else "conversations"
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: {key}[{i}] needs role (user / assistant / system) and string content; found role {role!r}"
            )
        out.append({"role": _ROLES[role], "content": content})
    return out


def _prompt_turns(record: dict, where: str, expected: str) -> list[dict]:
    """The conversation up to the response: a list of {role, content} ending with a user turn."""
    if "messages" in record or "conversations" in record:
        turns = _messages(record, where)
        while turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
    elif "prompt" in record:
        turns = [{"role": "user", "content": _text(record, "prompt", where)}]
    elif "instruction" in record:
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        turns = [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction}]
    else:
        raise DataError(f"{where}: missing field 'instruction' (expected {expected}); found fields {sorted(record)}")
    system = _text(record, "system", where, required=False)
    if system and not any(t["role"] == "system" for t in turns):
        turns = [{"role": "system", "content": system}] + turns
    if not any(t["role"] == "user" and t["content"].strip() for t in turns):
        raise DataError(f"{where}: empty prompt")
    return turns


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: loading, pad token, templates


def load_tokenizer(path: str):
    """The tokenizer of a local HF directory (files only: no hub, no remote code)."""
    import transformers

    try:
        # A directory that says its tokenizer is a plain tokenizers-library one (transformers 5 writes
        # "TokenizersBackend", 4.x "PreTrainedTokenizerFast") gets exactly that: AutoTokenizer would otherwise pick
        # the class of config.json's model_type (Qwen2Tokenizer for qwen2) and rebuild it from the vocabulary,
        # which scrambles a non-BPE tokenizer (a WordLevel one loses its ids).
        if _declared_tokenizer_class(path) in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types; the message is what the user needs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot load the tokenizer ({first})") from None


def _declared_tokenizer_class(path: str) -> Optional[str]:
    """`tokenizer_class` of a directory's tokenizer_config.json, or None."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def ensure_pad_token(tokenizer) -> tuple[Any, bool]:
    """Gives the tokenizer a dedicated pad token distinct from every EOS id (PPO_DETAILS item 1).

    Returns (tokenizer, added): `added` is True when a new token `PAD_TOKEN` was added to the vocabulary. Its id
    `tokenizer.pad_token_id` may then be >= the model's embedding rows; grow them with `resize_embeddings`
    (many models already have spare rows, e.g. Qwen2.5's 151936 rows for ~151665 tokens: no resize needed).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer, False
    added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN}) > 0
    if tokenizer.pad_token_id == eos:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r} is its EOS and could not be replaced")
    return tokenizer, added


def resize_embeddings(params: dict, vocab_size: int) -> dict:
    """Grows `embed/embedding` [V, H] (and an untied `lm_head/kernel` [H, V]) to `vocab_size` rows / columns.

    New rows are the mean of the existing ones (transformers' `resize_token_embeddings` default), in the
    params' dtype. A no-op when the params already have `vocab_size` or more rows. The model's
    `ModelConfig.vocab_size` must be raised to match: `dataclasses.replace(config, vocab_size=...)`.
    """
    embedding = params["embed"]["embedding"]
    old = embedding.shape[0]
    if vocab_size <= old:
        return params
    extra = vocab_size - old
    mean_row = jnp.mean(embedding.astype(jnp.float32), axis=0, keepdims=True).astype(embedding.dtype)
    out = dict(params)
    out["embed"] = {**params["embed"], "embedding": jnp.concatenate([embedding, jnp.repeat(mean_row, extra, 0)], 0)}
    if "lm_head" in params:
        kernel = params["lm_head"]["kernel"]
        mean_col = jnp.mean(kernel.astype(jnp.float32), axis=1, keepdims=True).astype(kernel.dtype)
        out["lm_head"] = {**params["lm_head"], "kernel": jnp.concatenate([kernel, jnp.repeat(mean_col, extra, 1)], 1)}
    return out


def is_raw_template(template: str) -> bool:
    return template.lower() in RAW_TEMPLATES


def encode_prompt(
    tokenizer,
    turns: list[dict],
    template: str,
    where: str = "",
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
) -> list[int]:
    """Token ids of the prompt: chat-templated with a generation prompt, or the raw text of the turns.
    default_system: the system prompt of a conversation that has none (LLaMA-Factory's key; chat templates only).
    enable_thinking: passed to the chat template when not None (Qwen3's switch: False renders the empty think
    block after the generation prompt, as LLaMA-Factory's `enable_thinking: false` does); templates without the
    switch, and raw text, ignore it, as LLaMA-Factory's non-reasoning templates do."""
    if default_system and not any(t["role"] == "system" for t in turns):
        if is_raw_template(template):
            raise DataError(
                f"{where + ': ' if where else ''}default_system needs a chat template; template {template!r} is raw text"
            )
        turns = [{"role": "system", "content": default_system}] + turns
    if is_raw_template(template):
        text = "\n\n".join(t["content"] for t in turns)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where + ': ' if where else ''}template {template!r} needs the tokenizer's chat template "
            "but the tokenizer has none; use template: none for raw text"
        )
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **switch)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, text: str) -> list[int]:
    """The response's tokens followed by the EOS id (so the model learns to stop)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


# ----------------------------------------------------------------------------------------------------------
# Datasets


@dataclasses.dataclass(frozen=True)
class PromptDataset:
    """PPO prompts: `prompts[i]` token ids (cut to max_prompt_length), `sources[i]` its file location,
    `truncated` how many rows were cut."""

    prompts: tuple[tuple[int, ...], ...]
    sources: tuple[str, ...]
    truncated: int

    def __len__(self):
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class ResponseDataset:
    """SFT rows or RM pairs: `prompts[i]` ids and `responses[i]` a tuple of response id lists (one for sft:
    the target; two for rm: chosen, rejected), each ending with the EOS id unless cut. `truncated` counts
    rows cut to cutoff_len."""

    prompts: tuple[tuple[int, ...], ...]
    responses: tuple[tuple[tuple[int, ...], ...], ...]
    sources: tuple[str, ...]
    truncated: int

    def __len__(self):
        return len(self.prompts)


def load_prompts(
    path: str,
    tokenizer,
    *,
    template: str,
    max_prompt_length: int,
    overflow: str = "truncate",
    max_samples: Optional[int] = None,
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
) -> PromptDataset:
    """PPO prompts. A prompt longer than `max_prompt_length` keeps its last tokens (overflow="truncate",
    counted in `truncated`) or is an error naming the row (overflow="refuse"). max_samples: read only the
    first that many records (LLaMA-Factory's key)."""
    if overflow not in ("truncate", "refuse"):
        raise ValueError(f"overflow must be 'truncate' or 'refuse', found {overflow!r}")
    prompts, sources, truncated = [], [], 0
    for where, record in read_dataset(path, max_samples):
        turns = _prompt_turns(record, where, "instruction/input, prompt or messages")
        ids = encode_prompt(tokenizer, turns, template, where, default_system, enable_thinking)
        if not ids:
            raise DataError(f"{where}: empty prompt (0 tokens)")
        if len(ids) > max_prompt_length:
            if overflow == "refuse":
                raise DataError(
                    f"{where}: prompt has {len(ids)} tokens, more than max_prompt_length "
                    f"{max_prompt_length}; raise max_prompt_length or set prompt_overflow: truncate"
                )
            ids = ids[-max_prompt_length:]
            truncated += 1
        prompts.append(tuple(ids))
        sources.append(where)
    return PromptDataset(tuple(prompts), tuple(sources), truncated)


def _fit(prompt: list[int], responses: list[list[int]], cutoff_len: int):
    """prompt + each response within cutoff_len: the prompt keeps its last tokens and leaves room for one
    response token; responses lose their end. Returns (prompt, responses, was_cut)."""
    if all(len(prompt) + len(r) <= cutoff_len for r in responses):
        return tuple(prompt), tuple(tuple(r) for r in responses), False
    prompt = prompt[-(cutoff_len - 1) :] if len(prompt) > cutoff_len - 1 else prompt
    room = cutoff_len - len(prompt)
    return tuple(prompt), tuple(tuple(r[:room]) for r in responses), True


def _response_dataset(
    path: str,
    tokenizer,
    template: str,
    cutoff_len: int,
    responses_of,
    max_samples: Optional[int] = None,
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
) -> ResponseDataset:
    prompts, responses, sources, truncated = [], [], [], 0
    for where, record in read_dataset(path, max_samples):
        texts, turns = responses_of(record, where)
        for key, text in texts:
            if not text.strip():
                raise DataError(f"{where}: empty '{key}' response")
        prompt, encoded, cut = _fit(
            encode_prompt(tokenizer, turns, template, where, default_system, enable_thinking),
            [encode_response(tokenizer, text) for _, text in texts],
            cutoff_len,
        )
        truncated += cut
        prompts.append(prompt)
        responses.append(encoded)
        sources.append(where)
    return ResponseDataset(tuple(prompts), tuple(responses), tuple(sources), truncated)


def load_preferences(
    path: str,
    tokenizer,
    *,
    template: str,
    cutoff_len: int,
    max_samples: Optional[int] = None,
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
) -> ResponseDataset:
    """Reward-model pairs: a prompt (any prompt format) with `chosen` and `rejected` responses (the first
    `max_samples` records when given)."""

    def pair(record, where):
        turns = _prompt_turns(record, where, "prompt or instruction/input or messages, with chosen and rejected")
        return [(key, _text(record, key, where)) for key in ("chosen", "rejected")], turns

    return _response_dataset(path, tokenizer, template, cutoff_len, pair, max_samples, default_system, enable_thinking)


def load_sft(
    path: str,
    tokenizer,
    *,
    template: str,
    cutoff_len: int,
    max_samples: Optional[int] = None,
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
) -> ResponseDataset:
    """SFT rows: instruction/input/output, prompt/response, or messages ending with an assistant turn (the first
    `max_samples` records when given)."""

    def target(record, where):
        if "messages" in record or "conversations" in record:
            turns = _messages(record, where)
            if turns[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last turn must be the assistant's answer for SFT")
            response = ("output", turns[-1]["content"])
        elif "output" in record or "response" in record:
            key = "output" if "output" in record else "response"
            response = (key, _text(record, key, where))
        else:
            raise DataError(f"{where}: missing field 'output' (the SFT target)")
        return [response], _prompt_turns(record, where, "instruction/input/output, prompt/response or messages")

    return _response_dataset(
        path, tokenizer, template, cutoff_len, target, max_samples, default_system, enable_thinking
    )


# ----------------------------------------------------------------------------------------------------------
# Length-balanced reward-model pairs (issue 10)


def drop_length_mismatched_pairs(dataset: ResponseDataset, max_length_diff: int) -> tuple[ResponseDataset, int]:
    """(the rm pairs whose chosen and rejected responses differ by at most `max_length_diff` tokens, how many
    were dropped).

    A reward model trained on pairs where the chosen answer is usually the longer one learns "longer is
    better", and PPO then pads its answers to farm reward. Keeping pairs of similar length removes that cue.
    Lengths are token counts of the responses as loaded (after the cutoff, EOS included in both).
    """
    if max_length_diff < 0:
        raise ValueError(f"max_length_diff must be >= 0, found {max_length_diff}")
    if dataset.responses and len(dataset.responses[0]) != 2:
        raise ValueError(
            f"length filtering needs (chosen, rejected) pairs, found {len(dataset.responses[0])} responses"
        )
    keep = [
        i
        for i, (chosen, rejected) in enumerate(dataset.responses)
        if abs(len(chosen) - len(rejected)) <= max_length_diff
    ]
    kept = dataclasses.replace(
        dataset,
        prompts=tuple(dataset.prompts[i] for i in keep),
        responses=tuple(dataset.responses[i] for i in keep),
        sources=tuple(dataset.sources[i] for i in keep),
    )
    return kept, len(dataset) - len(keep)


# ----------------------------------------------------------------------------------------------------------
# Batching with a resumable position


class DataPosition(NamedTuple):
    """Where the data stream stands: `offset` examples of epoch `epoch`'s permutation are consumed."""

    epoch: int = 0
    offset: int = 0


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(
    num_examples: int, batch_size: int, *, seed: int, position: DataPosition = DataPosition()
) -> Iterator[tuple[np.ndarray, DataPosition]]:
    """Endless (indices [batch_size], position after this batch). The last partial batch of an epoch is dropped
    so every batch has one shape (one compilation)."""
    if batch_size > num_examples:
        raise DataError(f"the dataset has {num_examples} examples, fewer than one batch of {batch_size}")
    epoch, offset = position
    while True:
        if offset + batch_size > num_examples:
            epoch, offset = epoch + 1, 0
        order = epoch_order(num_examples, seed, epoch)
        indices = order[offset : offset + batch_size]
        offset += batch_size
        yield indices, DataPosition(epoch, offset)


class PromptBatch(NamedTuple):
    """ids, mask: [B, P] int32 LEFT-padded; indices [B] into the dataset; position: after this batch."""

    ids: np.ndarray
    mask: np.ndarray
    indices: np.ndarray
    position: DataPosition


def prompt_batches(
    dataset: PromptDataset,
    batch_size: int,
    *,
    pad_token_id: int,
    seed: int,
    position: DataPosition = DataPosition(),
    bucket: int = 64,
) -> Iterator[PromptBatch]:
    """Endless left-padded prompt batches; P is bucketed (`pad_prompts`) so few prompt widths compile."""
    for indices, after in batch_indices(len(dataset), batch_size, seed=seed, position=position):
        ids, mask = pad_prompts([dataset.prompts[i] for i in indices], pad_token_id, bucket=bucket)
        yield PromptBatch(ids, mask, indices, after)


def pad_responses(
    responses: Sequence[Sequence[int]], pad_token_id: int, *, bucket: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """RIGHT-padded (ids, mask) [B, N] int32 with N a multiple of `bucket`."""
    width = max(1, -(-max(len(r) for r in responses) // bucket)) * bucket
    ids = np.full((len(responses), width), pad_token_id, np.int32)
    mask = np.zeros((len(responses), width), np.int32)
    for row, response in enumerate(responses):
        ids[row, : len(response)] = response
        mask[row, : len(response)] = 1
    return ids, mask


class ResponseBatch(NamedTuple):
    """prompt_ids, prompt_mask [B, P] LEFT-padded; responses: one (ids, mask) [B, N] RIGHT-padded pair per
    response kind (sft: the target; rm: chosen, rejected); indices [B]; position after this batch. The fields
    map onto `ppojax.train.SequenceBatch` / `PreferenceBatch`."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    responses: tuple
    indices: np.ndarray
    position: DataPosition


def response_batches(
    dataset: ResponseDataset,
    batch_size: int,
    *,
    pad_token_id: int,
    seed: int,
    position: DataPosition = DataPosition(),
    bucket: int = 64,
) -> Iterator[ResponseBatch]:
    """Endless sft / rm batches: prompts left-padded, responses right-padded, both to bucketed widths."""
    kinds = len(dataset.responses[0])
    for indices, after in batch_indices(len(dataset), batch_size, seed=seed, position=position):
        prompt_ids, prompt_mask = pad_prompts([dataset.prompts[i] for i in indices], pad_token_id, bucket=bucket)
        # every kind (rm: chosen and rejected) padded to one width: they are concatenated into one forward pass
        ids, mask = pad_responses(
            [dataset.responses[i][k] for k in range(kinds) for i in indices], pad_token_id, bucket=bucket
        )
        rows = len(indices)
        responses = tuple((ids[k * rows : (k + 1) * rows], mask[k * rows : (k + 1) * rows]) for k in range(kinds))
        yield ResponseBatch(prompt_ids, prompt_mask, responses, indices, after)
