"""Tokenizers: any local Hugging Face ``tokenizer.json``, or a self-contained byte-level fallback.

Both expose ``encode`` / ``decode``, ``vocab_size`` and ``special_ids`` (the Qwen chat and vision
tokens). Special-token strings inside text are encoded as their single ids, as in transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
QWEN_SPECIAL_IDS = {
    ENDOFTEXT: 151643,
    IM_START: 151644,
    IM_END: 151645,
    VISION_START: 151652,
    VISION_END: 151653,
    IMAGE_PAD: 151655,
    VIDEO_PAD: 151656,
}


class Tokenizer(Protocol):
    """What the chat template, data pipeline and demo need from a tokenizer."""

    vocab_size: int
    special_ids: Mapping[str, int]  # the tokens of SPECIAL_TOKENS it has -> id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings become their ids; no BOS/EOS is added."""
        ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        ...


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from a Hugging Face ``tokenizer.json``.

    ``special_ids`` holds those of ``SPECIAL_TOKENS`` the vocabulary has (Qwen2, Qwen2.5 and
    Qwen2.5-VL tokenizers have all of them).
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.special_ids = {t: i for t, i in ids.items() if i is not None}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus the Qwen special tokens at configurable ids.

    ``special_ids`` maps every token of ``SPECIAL_TOKENS`` to an id in ``[256, vocab_size)``;
    by default they take 256..262 in ``SPECIAL_TOKENS`` order. Ids that are neither a byte nor a
    special token (a small random model may emit them) decode to U+FFFD.
    """

    def __init__(self, vocab_size: int = 512, special_ids: Mapping[str, int] | None = None):
        special_ids = dict(special_ids or {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})
        if set(special_ids) != set(SPECIAL_TOKENS):
            raise ValueError(f"special_ids must map exactly {SPECIAL_TOKENS}, got {sorted(special_ids)}")
        ids = list(special_ids.values())
        if len(set(ids)) != len(ids) or min(ids) < 256 or max(ids) >= vocab_size:
            raise ValueError(f"special ids must be distinct and in [256, {vocab_size}), got {special_ids}")
        self.vocab_size = vocab_size
        self.special_ids = special_ids
        self._id_to_special = {i: t for t, i in special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            parts.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if i in self._id_to_special:
                parts.append("" if skip_special_tokens else self._id_to_special[i])
            else:
                parts.append("\ufffd")
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """Tokenizer of a local Hugging Face model or tokenizer directory (its ``tokenizer.json``)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return HFTokenizer(file)


def byte_tokenizer_for(config: Any) -> ByteTokenizer:
    """The byte-level fallback for a model config (`nsa_jax.config.ModelConfig`): its vocabulary size and vision
    token ids, the chat tokens on the lowest ids from 256 that these leave free (so `tiny_config`'s model gets
    `ByteTokenizer()`'s default layout)."""
    vision = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
              IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id}
    free = (i for i in range(256, config.text.vocab_size) if i not in vision.values())
    return ByteTokenizer(config.text.vocab_size, {ENDOFTEXT: next(free), IM_START: next(free), IM_END: next(free),
                                                  **vision})


def load_tokenizer_or_bytes(path: str | Path | None, config: Any) -> Tokenizer:
    """`load_tokenizer(path)`, or without a path the byte-level fallback of the model config (`byte_tokenizer_for`):
    the one fallback of training, evaluation and analysis."""
    return load_tokenizer(path) if path else byte_tokenizer_for(config)
