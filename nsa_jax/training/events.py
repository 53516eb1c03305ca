"""Metrics files: a minimal TensorBoard event-file writer for scalars (no TensorFlow / tensorboard dependency)
and `metrics.jsonl`, which holds each step once across kills and resumes.

Writes `events.out.tfevents.*` records (TFRecord framing with masked CRC32C around `Event` protobufs,
encoded by hand: wall_time, step and a `Summary` of simple_value scalars) that TensorBoard reads.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Mapping, TextIO


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _event(step: int, wall_time: float, values: Mapping[str, float] | None = None, version: str | None = None
           ) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if version is not None:
        msg += _field(3, 2, version.encode())
    if values:
        summary = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                           for tag, v in values.items())
        msg += _field(5, 2, summary)
    return msg


class EventWriter:
    """Appends scalar summaries to one event file in `logdir`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(_event(step, time.time(), values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_metrics(path: str, step: int) -> TextIO:
    """`path` (metrics.jsonl, one JSON row per step) opened to append the rows after `step`, the step training
    resumes from: rows of later steps (logged after the last checkpoint by a run that was killed, or past a
    `resume_from_step`) and a torn last line move to `<name>.abandoned.jsonl` beside it, so the file holds
    each step once and nothing written is lost."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        later = [line for line in lines if not _row_up_to(line, step)]
        if later:
            with open(abandoned_metrics_path(path), "a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in later)
            with open(path + ".tmp", "w") as f:
                f.writelines(line for line in lines if _row_up_to(line, step))
            os.replace(path + ".tmp", path)
    return open(path, "a")


def abandoned_metrics_path(path: str) -> str:
    """Where `open_metrics` keeps the rows it takes out of `path`."""
    return os.path.splitext(path)[0] + ".abandoned.jsonl"


def _row_up_to(line: str, step: int) -> bool:
    """Whether `line` is a whole metrics row of a step <= `step`."""
    if not line.endswith("\n"):
        return False
    try:
        return int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
        return False
