"""LLaMA-Factory dataset names (`dataset: name` + dataset_info.json): the records each formatting describes read as
the same prompts / pairs / SFT rows as the equivalent ppojax records written by hand."""

import json
import os

import pytest

from ppojax import dataset_info
from ppojax.config import ConfigError, config_from_dict
from ppojax.data import DataError, load_preferences, load_prompts, load_sft
from tests.test_data import ids, make_tokenizer

ALPACA = [  # LLaMA-Factory's alpaca formatting with its own column names, a history and a system column
    {"q": "write a poem", "ctx": "", "a": "yes", "sys": "no", "hist": [["hi", "yes"]]},
    {"q": "write", "ctx": "a poem", "a": "no", "sys": "", "hist": []},
]
SHAREGPT = [  # sharegpt with other tags, a system turn first
    {"chat": [{"who": "sys", "text": "no"}, {"who": "me", "text": "hi there"}, {"who": "bot", "text": "yes"}]},
    {"chat": [{"who": "me", "text": "the cat"}, {"who": "bot", "text": "sat"}, {"who": "me", "text": "hi"}]},
]
PAIRS = [  # ranking, alpaca
    {"instruction": "write a poem", "input": "", "chosen": "good", "rejected": "bad"},
]
SHAREGPT_PAIRS = [  # ranking, sharegpt: chosen / rejected are turns
    {
        "conversations": [{"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "yes"},
        "rejected": {"from": "gpt", "value": "no"},
    },
]
INFO = {
    "my_alpaca": {
        "file_name": "alpaca.json",
        "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"},
    },
    "my_chat": {
        "file_name": "chats",  # a directory of files
        "formatting": "sharegpt",
        "columns": {"messages": "chat"},
        "tags": {
            "role_tag": "who",
            "content_tag": "text",
            "user_tag": "me",
            "assistant_tag": "bot",
            "system_tag": "sys",
        },
    },
    "my_pairs": {"file_name": "pairs.jsonl", "ranking": True, "columns": {"chosen": "chosen", "rejected": "rejected"}},
    "my_chat_pairs": {"file_name": "chat_pairs.json", "formatting": "sharegpt", "ranking": True},
    "my_openai": {
        "file_name": "openai.jsonl",
        "formatting": "openai",
        "columns": {"messages": "messages"},  # LLaMA-Factory's default column is "conversations" for every formatting
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
}


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    _write(root / "alpaca.json", ALPACA)
    _write(root / "chats" / "a.json", SHAREGPT[:1])
    _write(root / "chats" / "b.jsonl", SHAREGPT[1:])
    _write(root / "pairs.jsonl", PAIRS)
    _write(root / "chat_pairs.json", SHAREGPT_PAIRS)
    _write(
        root / "openai.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}],
    )
    (root / "dataset_info.json").write_text(json.dumps(INFO))
    return root


def test_each_formatting_reads_as_the_records_written_by_hand(data_dir, tmp_path):
    tok = make_tokenizer()
    entries = dataset_info.resolve("my_alpaca, my_chat,my_openai", str(data_dir))
    assert [e.name for e in entries] == ["my_alpaca", "my_chat", "my_openai"]
    assert entries[1].files == (str(data_dir / "chats" / "a.json"), str(data_dir / "chats" / "b.jsonl"))
    # The same data as ppojax records: history as turns, instruction and input joined by a newline, the system.
    native = [
        {"messages": [{"role": "system", "content": "no"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yes"}, {"role": "user", "content": "write a poem"},
                      {"role": "assistant", "content": "yes"}]},
        {"instruction": "write", "input": "a poem", "output": "no"},
        {"system": "no", "messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                      {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]},
    ]  # fmt: skip
    _write(tmp_path / "native.jsonl", native)
    for template in ("qwen", "none"):
        named = load_prompts(entries, tok, template=template, max_prompt_length=64)
        by_hand = load_prompts(str(tmp_path / "native.jsonl"), tok, template=template, max_prompt_length=64)
        assert named.prompts == by_hand.prompts
    chat = load_prompts(entries, tok, template="qwen", max_prompt_length=64)
    assert list(chat.prompts[2]) == ids("<s> system : no <eos> <s> user : hi there <eos> <s> assistant :")
    assert chat.sources[0] == f"{data_dir / 'alpaca.json'} record 0" and chat.sources[3].endswith("b.jsonl:1")
    # SFT rows: the response is the last assistant turn (the third conversation ends with a user turn).
    sft_entries = dataset_info.resolve("my_alpaca", str(data_dir))
    named = load_sft(sft_entries, tok, template="qwen", cutoff_len=64)
    _write(tmp_path / "native_sft.jsonl", native[:2])
    assert (
        named.responses == load_sft(str(tmp_path / "native_sft.jsonl"), tok, template="qwen", cutoff_len=64).responses
    )
    assert [list(r[0]) for r in named.responses] == [ids("yes <eos>"), ids("no <eos>")]
    # max_samples caps each dataset (LLaMA-Factory's rule), not the concatenation.
    capped = load_prompts(entries, tok, template="none", max_prompt_length=64, max_samples=1)
    assert capped.prompts == tuple(by_hand.prompts[i] for i in (0, 2, 4))


def test_preference_pairs_in_both_formattings(data_dir, tmp_path):
    tok = make_tokenizer()
    entries = dataset_info.resolve("my_pairs,my_chat_pairs", str(data_dir))
    named = load_preferences(entries, tok, template="qwen", cutoff_len=64)
    native = [
        {"prompt": "write a poem", "chosen": "good", "rejected": "bad"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"},
    ]
    _write(tmp_path / "pairs.jsonl", native)
    by_hand = load_preferences(str(tmp_path / "pairs.jsonl"), tok, template="qwen", cutoff_len=64)
    assert named.prompts == by_hand.prompts and named.responses == by_hand.responses
    assert [list(r) for r in named.responses[1]] == [ids("yes <eos>"), ids("no <eos>")]


def test_the_config_takes_dataset_names(data_dir, tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    raw = dict(model_name_or_path="model", stage="sft", output_dir="out")
    config = config_from_dict({**raw, "dataset": "my_alpaca, my_chat"})  # data/dataset_info.json: the default
    assert config.dataset == "my_alpaca,my_chat"
    assert [e.name for e in config.dataset_source] == ["my_alpaca", "my_chat"]
    os.rename(data_dir, tmp_path / "elsewhere")
    config = config_from_dict({**raw, "dataset": "my_pairs", "dataset_dir": "elsewhere", "stage": "rm"})
    assert config.dataset_source[0].files == (str(tmp_path / "elsewhere" / "pairs.jsonl"),)
    path_config = config_from_dict({**raw, "dataset": "alpaca.json", "dataset_dir": "elsewhere"})
    assert path_config.dataset_source == str(tmp_path / "elsewhere" / "alpaca.json")  # a file still is a file
    message = str(pytest.raises(ConfigError, config_from_dict, {**raw, "dataset": "my_alpaca"}).value)
    assert "'dataset' is 'my_alpaca' but" in message and "there is no data/dataset_info.json" in message
    message = str(
        pytest.raises(ConfigError, config_from_dict, {**raw, "dataset": "nope", "dataset_dir": "elsewhere"}).value
    )
    assert "dataset_info.json: no dataset named 'nope' (it describes: my_alpaca, my_chat" in message


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"hf_hub_url": "org/set"}, "hf_hub_url is a remote dataset; ppojax reads local files only"),
        ({"formatting": "alpaca"}, "missing file_name"),
        ({"file_name": "missing.json"}, "file_name .*missing.json does not exist"),
        ({"file_name": "alpaca.json", "formatting": "csv"}, "formatting 'csv'; allowed: alpaca, sharegpt, openai"),
        ({"file_name": "alpaca.json", "columns": {"images": "img"}}, "the 'images' column .* is not supported"),
        ({"file_name": "alpaca.json", "num_samples": 3}, "num_samples .* is not supported; use max_samples"),
        ({"file_name": "info.txt"}, r"info.txt is not a .json or .jsonl file"),
    ],
)
def test_bad_entries_are_one_line_errors(data_dir, entry, message):
    (data_dir / "info.txt").write_text("x")
    (data_dir / "dataset_info.json").write_text(json.dumps({"bad": entry}))
    with pytest.raises(ConfigError, match=message) as info:
        dataset_info.resolve("bad", str(data_dir))
    assert "\n" not in str(info.value) and "dataset 'bad'" in str(info.value)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chat": [{"who": "bot", "text": "yes"}]}, r"chat\[0\] has role 'bot'; expected the user tag \('me'\)"),
        ({"chat": [{"who": "me", "text": "hi"}, {"who": "me", "text": "hi"}]}, "expected the assistant tag"),
        ({"chat": [{"who": "observation", "text": "{}"}]}, "is a tool turn .* tools are not supported"),
        ({"chat": [{"who": "me", "text": 3}]}, r"chat\[0\] needs 'who' and a text 'text'"),
        ({"chat": "hi"}, "field 'chat' must be a list of turns"),
    ],
)
def test_bad_records_name_the_file_and_line(data_dir, record, message):
    _write(data_dir / "chats" / "b.jsonl", [record])
    with pytest.raises(DataError, match=message) as info:
        load_prompts(
            dataset_info.resolve("my_chat", str(data_dir)), make_tokenizer(), template="none", max_prompt_length=64
        )
    assert str(info.value).startswith(str(data_dir / "chats" / "b.jsonl:1"))
    bad_history = dict(ALPACA[0], hist=[["hi"]])
    _write(data_dir / "alpaca.json", [bad_history])
    with pytest.raises(DataError, match=r"alpaca.json record 0: field 'hist' must be a list of \[user, assistant\]"):
        load_prompts(
            dataset_info.resolve("my_alpaca", str(data_dir)), make_tokenizer(), template="none", max_prompt_length=64
        )
