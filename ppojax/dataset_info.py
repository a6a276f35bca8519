"""LLaMA-Factory's dataset registry: `dataset: name[,name ...]` looked up in `<dataset_dir>/dataset_info.json`.

LLaMA-Factory configs name their datasets (`dataset: my_ppo_prompts`) and describe each in `dataset_info.json`
beside the data (`dataset_dir`, default `data`): `file_name` (a file, or a directory of files, relative to
dataset_dir), `formatting` (alpaca, sharegpt or openai), `ranking` (preference pairs), `columns` (which field holds
the instruction, input, output, system, history, messages, chosen, rejected) and, for conversations, `tags` (the
role and content keys and the role names). This module reads local entries and turns every record into a
ppojax record (`ppojax.data` reads those): alpaca records with their history, and conversations, become
`messages` (the response, when there is one, as the last assistant turn); preference pairs keep `chosen` /
`rejected` as text. Entries on a hub (`hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`,
`cloud_file_name`), images / videos / audios, tools and KTO tags are refused with the reason: ppojax reads local
text data only.

The rules follow LLaMA-Factory's `DatasetAttr` defaults and its alpaca / sharegpt converters: instruction and input
joined by a newline (empty parts left out), history as alternating user / assistant turns before it, a sharegpt
system turn only first, user (or observation) turns at even positions and assistant (or function) turns at odd
ones. Where LLaMA-Factory skips a malformed example with a warning, ppojax stops with a one-line error naming the
file and line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Iterator, Optional

from ppojax.config import ConfigError
from ppojax.data import DataError, read_records

DATASET_INFO = "dataset_info.json"
DEFAULT_DATASET_DIR = "data"  # LLaMA-Factory's
FORMATTINGS = ("alpaca", "sharegpt", "openai")
_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_COLUMNS = {  # LLaMA-Factory's DatasetAttr column defaults (its chosen / rejected have none: named here)
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "messages": "conversations",
    "system": None,
    "chosen": "chosen",
    "rejected": "rejected",
}
_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_UNSUPPORTED_COLUMNS = {
    "images": "images",
    "videos": "videos",
    "audios": "audio",
    "tools": "tool calls",
    "kto_tag": "KTO labels",
}


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One local dataset of a dataset_info.json, ready to read."""

    name: str
    files: tuple[str, ...]
    formatting: str = "alpaca"
    ranking: bool = False
    columns: tuple[tuple[str, Optional[str]], ...] = ()
    tags: tuple[tuple[str, Optional[str]], ...] = ()

    def column(self, name: str) -> Optional[str]:
        return dict(self.columns).get(name)

    def tag(self, name: str) -> Optional[str]:
        return dict(self.tags).get(name)


def info_path(dataset_dir: Optional[str]) -> str:
    return os.path.join(dataset_dir or DEFAULT_DATASET_DIR, DATASET_INFO)


def split_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def resolve(value: str, dataset_dir: Optional[str], where: str = "dataset") -> tuple[DatasetEntry, ...]:
    """The entries `value` (a comma list of names) refers to in `<dataset_dir or data>/dataset_info.json`.
    Errors: `ConfigError`, one line naming the file and the dataset."""
    path = info_path(dataset_dir)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path} ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: expected a JSON object of dataset name -> description")
    names = split_names(value)
    if not names:
        raise ConfigError(f"{where}: 'dataset' is empty")
    return tuple(_entry(name, info, path, os.path.dirname(path)) for name in names)


def _entry(name: str, info: dict, path: str, directory: str) -> DatasetEntry:
    if name not in info:
        known = ", ".join(sorted(info)[:8]) or "none"
        raise ConfigError(f"{path}: no dataset named {name!r} (it describes: {known})")
    attr = info[name]
    where = f"{path}: dataset {name!r}"
    if not isinstance(attr, dict):
        raise ConfigError(f"{where}: expected an object with file_name, found {type(attr).__name__}")
    remote = [key for key in _REMOTE if key in attr]
    if remote:
        raise ConfigError(
            f"{where}: {remote[0]} is a remote dataset; ppojax reads local files only (download it and give file_name)"
        )
    if not isinstance(attr.get("file_name"), str):
        raise ConfigError(f"{where}: missing file_name (the local file or directory of the data)")
    formatting = attr.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise ConfigError(f"{where}: formatting {formatting!r}; allowed: {', '.join(FORMATTINGS)}")
    if attr.get("num_samples") is not None:
        raise ConfigError(f"{where}: num_samples (random sampling) is not supported; use max_samples in the config")
    if attr.get("split", "train") != "train":
        raise ConfigError(f"{where}: split {attr['split']!r}; a local file has only the train split")
    given = attr.get("columns") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: columns must be an object of column -> field name")
    for column, what in _UNSUPPORTED_COLUMNS.items():
        if given.get(column):
            raise ConfigError(f"{where}: the {column!r} column ({what}) is not supported; ppojax trains on text only")
    columns = {**_COLUMNS, **{key: value for key, value in given.items() if key in _COLUMNS}}
    given_tags = attr.get("tags") or {}
    if not isinstance(given_tags, dict):
        raise ConfigError(f"{where}: tags must be an object of tag -> name")
    tags = {**_TAGS, **{key: value for key, value in given_tags.items() if key in _TAGS}}
    return DatasetEntry(
        name=name,
        files=_files(os.path.join(directory, attr["file_name"]), where),
        formatting=formatting,
        ranking=bool(attr.get("ranking", False)),
        columns=tuple(sorted(columns.items())),
        tags=tuple(sorted(tags.items())),
    )


def _files(path: str, where: str) -> tuple[str, ...]:
    """The data files of a file_name: the file, or every file of the directory (sorted); .json / .jsonl only."""
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in sorted(os.listdir(path)) if not name.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ConfigError(f"{where}: file_name {path} does not exist")
    for file in files:
        if os.path.splitext(file)[1].lower() not in (".json", ".jsonl"):
            raise ConfigError(f"{where}: {file} is not a .json or .jsonl file (ppojax reads JSON records only)")
    if not files:
        raise ConfigError(f"{where}: the directory {path} has no data files")
    return tuple(files)


def read(entries: tuple[DatasetEntry, ...], max_samples: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """(where, ppojax record) for every record of every entry in turn; `max_samples` caps each dataset, as
    LLaMA-Factory's max_samples does."""
    for entry in entries:
        records = itertools.chain.from_iterable(read_records(file) for file in entry.files)
        for where, record in itertools.islice(records, max_samples):
            yield where, convert(entry, record, where)


def convert(entry: DatasetEntry, record: dict, where: str) -> dict:
    """A LLaMA-Factory record (as `entry` describes it) as a ppojax record: {"messages", "chosen"?, "rejected"?}."""
    if entry.formatting == "alpaca":
        turns = _alpaca_turns(entry, record, where)
    else:
        turns = _conversation_turns(entry, record, where)
    out: dict[str, Any] = {"messages": turns}
    if entry.ranking:
        for key in ("chosen", "rejected"):
            column = entry.column(key)
            value = record.get(column)
            if isinstance(value, dict):  # a sharegpt turn
                value = value.get(entry.tag("content_tag"))
            if not isinstance(value, str):
                raise DataError(f"{where}: ranking dataset {entry.name!r} needs a text '{column}' field")
            out[key] = value
    return out


def _field(record: dict, column: Optional[str], where: str) -> Optional[str]:
    if not column or record.get(column) in (None, ""):
        return None
    value = record[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, found {type(value).__name__}")
    return value


def _alpaca_turns(entry: DatasetEntry, record: dict, where: str) -> list[dict]:
    turns = []
    system = _field(record, entry.column("system"), where)
    if system:
        turns.append({"role": "system", "content": system})
    history_column = entry.column("history")
    history = record.get(history_column) if history_column else None
    if history is not None:
        if not isinstance(history, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
            for pair in history
        ):
            raise DataError(f"{where}: field '{history_column}' must be a list of [user, assistant] text pairs")
        for user, assistant in history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    query = [
        text
        for text in (_field(record, entry.column("prompt"), where), _field(record, entry.column("query"), where))
        if text
    ]
    turns.append({"role": "user", "content": "\n".join(query)})
    response = None if entry.ranking else _field(record, entry.column("response"), where)
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


def _conversation_turns(entry: DatasetEntry, record: dict, where: str) -> list[dict]:
    column = entry.column("messages")
    messages = record.get(column)
    if not isinstance(messages, list):
        raise DataError(f"{where}: field '{column}' must be a list of turns")
    role_tag, content_tag = entry.tag("role_tag"), entry.tag("content_tag")
    roles = {
        entry.tag("user_tag"): "user",
        entry.tag("assistant_tag"): "assistant",
        entry.tag("system_tag"): "system",
    }
    for unsupported in ("observation_tag", "function_tag"):
        roles.setdefault(entry.tag(unsupported), None)
    turns = []
    system = _field(record, entry.column("system"), where)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get(content_tag), str):
            raise DataError(f"{where}: {column}[{i}] needs '{role_tag}' and a text '{content_tag}'")
        role = roles.get(message.get(role_tag), "unknown")
        if role == "system" and i == 0:
            system = message[content_tag]
            continue
        if role is None:
            raise DataError(
                f"{where}: {column}[{i}] is a tool turn ({message.get(role_tag)!r}); tools are not supported"
            )
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{where}: {column}[{i}] has role {message.get(role_tag)!r}; expected the {expected} tag "
                f"({entry.tag('user_tag' if expected == 'user' else 'assistant_tag')!r}) there"
            )
        turns.append({"role": role, "content": message[content_tag]})
    if not turns:
        raise DataError(f"{where}: field '{column}' has no user turn")
    return ([{"role": "system", "content": system}] if system else []) + turns
