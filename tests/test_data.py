"""Data: record formats, chat templates, one-line errors with file and line, the pad token, resumable batches."""

import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from ppojax.data import (
    PAD_TOKEN,
    DataError,
    DataPosition,
    batch_indices,
    ensure_pad_token,
    load_preferences,
    load_prompts,
    load_sft,
    prompt_batches,
    read_records,
    resize_embeddings,
    response_batches,
)

WORDS = "<unk> <eos> <s> user assistant system : hi there write a poem good bad yes no and the cat sat".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def make_tokenizer(pad=None, chat=True):
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "<eos>", "<unk>"])  # matched whole, ids kept
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token=pad
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, list) and name.endswith(".jsonl"):
        content = "\n".join(json.dumps(r) for r in content) + "\n"
    elif not isinstance(content, str):
        content = json.dumps(content, indent=1)
    path.write_text(content)
    return str(path)


def error(fn, *args, **kwargs):
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_prompt_formats_raw_and_templated(tmp_path):
    tok = make_tokenizer()
    records = [
        {"instruction": "write a poem", "input": ""},
        {"instruction": "write", "input": "a poem"},
        {"prompt": "hi there"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
        {"conversations": [{"from": "human", "value": "the cat"}]},
    ]
    path = write(tmp_path, "p.json", records)
    raw = load_prompts(path, tok, template="none", max_prompt_length=64)
    assert [list(p) for p in raw.prompts] == [
        ids("write a poem"),
        ids("write a poem"),
        ids("hi there"),
        ids("hi"),
        ids("the cat"),
    ]
    assert raw.sources[2] == f"{path} record 2" and raw.truncated == 0
    chat = load_prompts(path, tok, template="qwen", max_prompt_length=64)
    # The trailing assistant turn of a messages record is dropped: PPO samples its own response.
    assert list(chat.prompts[3]) == ids("<s> user : hi <eos> <s> assistant :")
    # LLaMA-Factory's max_samples: only the first records are used.
    capped = load_prompts(path, tok, template="none", max_prompt_length=64, max_samples=2)
    assert [list(p) for p in capped.prompts] == [ids("write a poem")] * 2 and len(capped.sources) == 2
    sft_path = write(tmp_path, "sft.jsonl", [{"prompt": "hi", "response": "yes"}] * 3)
    assert len(load_sft(sft_path, tok, template="none", cutoff_len=64, max_samples=2)) == 2
    pairs_path = write(tmp_path, "pairs.jsonl", [{"prompt": "a", "chosen": "yes", "rejected": "no"}] * 4)
    assert len(load_preferences(pairs_path, tok, template="none", cutoff_len=64, max_samples=1)) == 1
    sys_path = write(tmp_path, "s.jsonl", [{"prompt": "hi", "system": "yes"}])
    assert list(load_prompts(sys_path, tok, template="qwen", max_prompt_length=64).prompts[0]) == ids(
        "<s> system : yes <eos> <s> user : hi <eos> <s> assistant :"
    )


def test_default_system_fills_in_for_records_without_one(tmp_path):
    """LLaMA-Factory's default_system: the system prompt of records that have none; a record's own wins."""
    tok = make_tokenizer()
    records = [{"prompt": "hi"}, {"prompt": "hi", "system": "yes"}, {"messages": [{"role": "user", "content": "hi"}]}]
    path = write(tmp_path, "p.jsonl", records)
    got = load_prompts(path, tok, template="qwen", max_prompt_length=64, default_system="no")
    assert [list(p) for p in got.prompts] == [
        ids("<s> system : no <eos> <s> user : hi <eos> <s> assistant :"),
        ids("<s> system : yes <eos> <s> user : hi <eos> <s> assistant :"),
        ids("<s> system : no <eos> <s> user : hi <eos> <s> assistant :"),
    ]
    sft = load_sft(
        write(tmp_path, "s.jsonl", [{"prompt": "hi", "response": "yes"}]),
        tok,
        template="qwen",
        cutoff_len=64,
        default_system="no",
    )
    assert list(sft.prompts[0]) == ids("<s> system : no <eos> <s> user : hi <eos> <s> assistant :")
    pairs = write(tmp_path, "r.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    rm = load_preferences(pairs, tok, template="qwen", cutoff_len=64, default_system="no")
    assert list(rm.prompts[0]) == ids("<s> system : no <eos> <s> user : hi <eos> <s> assistant :")
    plain = load_prompts(path, tok, template="qwen", max_prompt_length=64)
    assert list(plain.prompts[0]) == ids("<s> user : hi <eos> <s> assistant :")
    assert "default_system needs a chat template" in error(
        load_prompts, path, tok, template="none", max_prompt_length=64, default_system="no"
    )


def test_enable_thinking_is_the_templates_switch(tmp_path):
    """LLaMA-Factory's enable_thinking: false appends the empty thought to a reasoning template's prompt (its
    `prompt_ids += thought ids`); ppojax passes the switch to the tokenizer's template (Qwen3's reads
    `enable_thinking is false` after the generation prompt, written here in the test vocabulary). Templates
    without the switch ignore it."""
    words = WORDS + ["<think>", "</think>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "<eos>", "<unk>", "<think>", "</think>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : "
        "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}{% endif %}"
    )
    word_ids = lambda text: [words.index(w) for w in text.split()]  # noqa: E731
    prompt = word_ids("<s> user : hi <eos> <s> assistant :")
    thought = word_ids("<think> </think>")  # LLaMA-Factory's thought words, encoded apart and appended
    path = write(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    for switch, expected in ((None, prompt), (True, prompt), (False, prompt + thought)):
        got = load_prompts(path, tok, template="qwen3", max_prompt_length=64, enable_thinking=switch)
        assert list(got.prompts[0]) == expected, switch
    sft = load_sft(
        write(tmp_path, "s.jsonl", [{"prompt": "hi", "response": "yes"}]),
        tok,
        template="qwen3",
        cutoff_len=64,
        enable_thinking=False,
    )
    assert list(sft.prompts[0]) == prompt + thought
    pairs = write(tmp_path, "r.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    rm = load_preferences(pairs, tok, template="qwen3", cutoff_len=64, enable_thinking=False)
    assert list(rm.prompts[0]) == prompt + thought
    # A template without the switch, and raw text, are unchanged by it.
    plain = make_tokenizer()
    for template in ("qwen", "none"):
        on = load_prompts(path, plain, template=template, max_prompt_length=64, enable_thinking=False)
        off = load_prompts(path, plain, template=template, max_prompt_length=64)
        assert on.prompts == off.prompts


def test_bad_data_names_file_and_line(tmp_path):
    tok = make_tokenizer()
    load = lambda p, **kw: load_prompts(
        p,
        tok,
        template="none",
        max_prompt_length=kw.get("m", 64),  # noqa: E731
        overflow=kw.get("o", "truncate"),
    )
    path = write(tmp_path, "bad.jsonl", '{"prompt": "hi"}\n{"prompt": "hi",}\n')
    assert error(load, path).startswith(f"{path}:2: malformed JSON")
    path = write(tmp_path, "bad.json", '[{"prompt": "hi"},\n {"prompt" "x"}]')
    assert error(load, path).startswith(f"{path}:2: malformed JSON")
    path = write(tmp_path, "missing.json", [{"prompt": "hi"}, {"question": "hi"}])
    msg = error(load, path)
    assert msg.startswith(f"{path} record 1: missing field 'instruction'") and "question" in msg
    path = write(tmp_path, "empty.jsonl", [{"prompt": "hi"}, {"instruction": "  ", "input": ""}])
    assert error(load, path) == f"{path}:2: empty prompt"
    path = write(tmp_path, "long.jsonl", [{"prompt": "hi"}, {"prompt": "the cat sat and the cat sat"}])
    msg = error(load, path, m=4, o="refuse")
    assert msg.startswith(f"{path}:2: prompt has 7 tokens, more than max_prompt_length 4")
    cut = load(path, m=4)
    assert cut.truncated == 1 and list(cut.prompts[1]) == ids("cat sat and the cat sat")[-4:]
    assert "chat template" in error(
        load_prompts, path, make_tokenizer(chat=False), template="qwen", max_prompt_length=9
    )
    assert "empty" in error(read_records, write(tmp_path, "nothing.json", "  \n"))
    assert "expected a JSON object" in error(read_records, write(tmp_path, "list.json", "[1]"))


def test_pad_token_is_dedicated_never_eos():
    tok, added = ensure_pad_token(make_tokenizer())
    assert added and tok.pad_token == PAD_TOKEN and tok.pad_token_id == len(WORDS)
    assert tok.pad_token_id != tok.eos_token_id
    tok, added = ensure_pad_token(make_tokenizer(pad="<eos>"))  # the GPT-2 habit pad = eos is replaced
    assert added and tok.pad_token_id != tok.eos_token_id
    tok, added = ensure_pad_token(make_tokenizer(pad="<unk>"))  # a distinct pad token is kept
    assert not added and tok.pad_token == "<unk>"


def test_resize_embeddings_mean_rows():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    head = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = resize_embeddings({"embed": {"embedding": emb}, "lm_head": {"kernel": head}, "other": 1}, 6)
    assert out["embed"]["embedding"].shape == (6, 3) and out["lm_head"]["kernel"].shape == (3, 6)
    np.testing.assert_allclose(out["embed"]["embedding"][5], emb.mean(0))
    np.testing.assert_allclose(out["lm_head"]["kernel"][:, 4], head.mean(1))
    np.testing.assert_array_equal(out["embed"]["embedding"][:4], emb)
    tied = resize_embeddings({"embed": {"embedding": emb}}, 5)
    assert tied["embed"]["embedding"].shape == (5, 3) and "lm_head" not in tied
    same = {"embed": {"embedding": emb}}
    assert resize_embeddings(same, 4) is same


def test_preferences_and_sft(tmp_path):
    tok, _ = ensure_pad_token(make_tokenizer())
    pairs = write(
        tmp_path,
        "pairs.jsonl",
        [
            {"prompt": "hi", "chosen": "good", "rejected": "bad"},
            {
                "instruction": "write",
                "input": "a poem",
                "chosen": {"role": "assistant", "content": "yes"},
                "rejected": "no",
            },
        ],
    )
    ds = load_preferences(pairs, tok, template="none", cutoff_len=64)
    assert len(ds) == 2 and ds.responses[0] == (tuple(ids("good <eos>")), tuple(ids("bad <eos>")))
    assert error(
        load_preferences,
        write(tmp_path, "p2.jsonl", [{"prompt": "hi", "chosen": "good"}]),
        tok,
        template="none",
        cutoff_len=64,
    ).endswith(":1: missing field 'rejected'")
    sft = write(
        tmp_path,
        "sft.json",
        [
            {"instruction": "hi", "output": "yes and no"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat sat"}]},
        ],
    )
    ds = load_sft(sft, tok, template="qwen", cutoff_len=11)
    assert ds.prompts[0] == tuple(ids("<s> user : hi <eos> <s> assistant :"))  # 8 tokens
    assert ds.responses[0] == (tuple(ids("yes and no")),) and ds.truncated == 2  # EOS cut: 11 tokens in all
    short = load_sft(sft, tok, template="qwen", cutoff_len=4)  # the prompt keeps its end, one response token
    assert short.prompts[0] == tuple(ids("<s> assistant :")) and short.responses[0] == (tuple(ids("yes")),)
    assert "missing field 'output'" in error(
        load_sft, write(tmp_path, "s2.json", [{"instruction": "hi"}]), tok, template="none", cutoff_len=8
    )
    batch = next(response_batches(ds, 2, pad_token_id=tok.pad_token_id, seed=0, bucket=4))
    ((resp_ids, resp_mask),) = batch.responses
    assert batch.prompt_ids.shape == (2, 8) and resp_ids.shape == (2, 4)
    assert (batch.prompt_mask[:, -1] == 1).all() and (resp_mask[:, 0] == 1).all()  # left / right padding
    pair_batch = next(
        response_batches(
            load_preferences(pairs, tok, template="none", cutoff_len=64),
            2,
            pad_token_id=tok.pad_token_id,
            seed=0,
            bucket=4,
        )
    )
    assert len(pair_batch.responses) == 2
    # chosen and rejected share one width even when their lengths fall in different buckets (one forward pass)
    uneven = write(
        tmp_path, "uneven.jsonl", [{"prompt": "hi", "chosen": "yes and no yes and no", "rejected": "no"}] * 2
    )
    ((chosen, _), (rejected, _)) = next(
        response_batches(
            load_preferences(uneven, tok, template="none", cutoff_len=64), 2, pad_token_id=0, seed=0, bucket=4
        )
    ).responses
    assert chosen.shape == rejected.shape == (2, 8)


def test_batches_are_deterministic_and_resumable(tmp_path):
    stream = batch_indices(10, 3, seed=5)
    first = [next(stream) for _ in range(8)]  # 3 full batches per epoch, the last partial one dropped
    assert [p for _, p in first[:4]] == [DataPosition(0, 3), DataPosition(0, 6), DataPosition(0, 9), DataPosition(1, 3)]
    assert sorted(np.concatenate([i for i, _ in first[:3]])) == sorted(set(np.concatenate([i for i, _ in first[:3]])))
    resumed = batch_indices(10, 3, seed=5, position=first[4][1])
    for (expected, pos), (got, got_pos) in zip(first[5:], resumed):
        np.testing.assert_array_equal(expected, got)
        assert pos == got_pos
    other = next(batch_indices(10, 3, seed=6))[0]
    assert not np.array_equal(other, first[0][0])
    assert "fewer than one batch" in error(lambda: next(batch_indices(2, 3, seed=0)))
    tok, _ = ensure_pad_token(make_tokenizer())
    path = write(tmp_path, "p.jsonl", [{"prompt": "hi"}, {"prompt": "the cat sat"}, {"prompt": "write a poem"}])
    batch = next(
        prompt_batches(
            load_prompts(path, tok, template="none", max_prompt_length=8),
            2,
            pad_token_id=tok.pad_token_id,
            seed=0,
            bucket=4,
        )
    )
    assert batch.ids.shape == (2, 4) and batch.position == DataPosition(0, 2)
    assert (batch.ids[batch.mask == 0] == tok.pad_token_id).all() and (batch.mask[:, -1] == 1).all()


def test_load_tokenizer_keeps_a_plain_fast_tokenizer_next_to_a_qwen2_config(tmp_path):
    """transformers 5's AutoTokenizer would rebuild this WordLevel tokenizer as Qwen2Tokenizer (config.json's
    model_type) and scramble its ids; load_tokenizer honours the declared PreTrainedTokenizerFast class."""
    from ppojax.data import load_tokenizer

    make_tokenizer().save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.encode("write a poem", add_special_tokens=False) == ids("write a poem")
    assert tokenizer.eos_token_id == WORDS.index("<eos>")
