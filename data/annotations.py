"""LLaVA-Video-178K annotations: reading and validating a JSON list or JSONL file.

An entry is `{"id": str, "video": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`; the
video placeholder (`<video>`, or `<image>` as the LLaVA-Video release writes it) appears exactly once, in a
human turn. Malformed entries, and a file that is not UTF-8, stop loading with an `AnnotationError` naming the
file and line; a missing file raises `DataError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

from data.errors import DataError

VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = (VIDEO_PLACEHOLDER, "<image>")
_ROLES = ("human", "gpt")
_WS = re.compile(r"[ \t\r\n]*")


class AnnotationError(DataError):
    """A malformed annotation file or entry; the message starts with `path:line:`."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: malformed annotation: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One validated entry; `conversations` uses `<video>` as the placeholder; `line` is where it starts."""

    id: str
    video: str
    conversations: tuple[tuple[str, str], ...]  # (from, value) pairs
    line: int

    def conversation_dicts(self) -> list[dict[str, str]]:
        return [{"from": role, "value": value} for role, value in self.conversations]


def _validate(entry: Any) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """Checks one decoded entry; raises ValueError with the reason."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    for key in ("id", "video", "conversations"):
        if key not in entry:
            raise ValueError(f"missing field {key!r}")
    sample_id, video, turns = entry["id"], entry["video"], entry["conversations"]
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool) or str(sample_id) == "":
        raise ValueError(f"'id' must be a non-empty string, got {sample_id!r}")
    if not isinstance(video, str) or not video:
        raise ValueError(f"'video' must be a non-empty string, got {video!r}")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    out = []
    placeholders = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}")
        value = turn["value"]
        count = sum(value.count(p) for p in _PLACEHOLDERS)
        if count and turn["from"] != "human":
            raise ValueError(f"conversations[{i}]: the video placeholder must be in a human turn")
        placeholders += count
        for p in _PLACEHOLDERS[1:]:
            value = value.replace(p, VIDEO_PLACEHOLDER)
        out.append((turn["from"], value))
    if placeholders != 1:
        raise ValueError(f"expected exactly one {VIDEO_PLACEHOLDER} placeholder, found {placeholders}")
    if not any(role == "gpt" for role, _ in out):
        raise ValueError("no 'gpt' answer turn")
    return str(sample_id), video, tuple(out)


class _LineCounter:
    """Line number of increasing offsets into a text, counted incrementally."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


def _json_list_entries(path: str, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each element of a top-level JSON list, decoded one at a time to keep line numbers."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    i = _WS.match(text, _WS.match(text).end() + 1).end()  # first element, past '['
    if text.startswith("]", i):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise AnnotationError(path, e.lineno, f"invalid JSON ({e.msg})") from None
        yield lines.at(i), value
        i = _WS.match(text, end).end()
        if i == len(text):
            raise AnnotationError(path, lines.at(i), "unterminated JSON list")
        if text[i] == "]":
            if text[i + 1:].strip():
                raise AnnotationError(path, lines.at(i), "content after the closing ']'")
            return
        if text[i] != ",":
            raise AnnotationError(path, lines.at(i), f"expected ',' or ']' after an entry, got {text[i]!r}")
        i = _WS.match(text, i + 1).end()


def _jsonl_entries(path: str, text: str) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as e:
                raise AnnotationError(path, line, f"invalid JSON ({e.msg})") from None


def _read_text(path: str) -> str:
    """The file's UTF-8 text; DataError when it is missing, AnnotationError when it is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"annotation file {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AnnotationError(path, raw.count(b"\n", 0, e.start) + 1,
                              f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                              "re-encode the file as UTF-8") from None


def load_annotations(path: str | os.PathLike) -> list[Annotation]:
    """All entries of a JSON list or JSONL annotation file, validated; raises AnnotationError."""
    path = os.fspath(path)
    text = _read_text(path)
    entries = _json_list_entries if text.lstrip().startswith("[") else _jsonl_entries
    out = []
    for line, entry in entries(path, text):
        try:
            sample_id, video, turns = _validate(entry)
        except ValueError as e:
            raise AnnotationError(path, line, str(e)) from None
        out.append(Annotation(sample_id, video, turns, line))
    return out
