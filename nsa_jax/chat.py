"""The Qwen2.5-VL chat template, vision pad expansion and the assistant-token mask.

``render_chat`` is a Python port of the Jinja template shipped with Qwen2-VL / Qwen2.5-VL
(``chat_template.json``): every message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, a
default system turn is prepended when the first message is not a system message, an image is
``<|vision_start|><|image_pad|><|vision_end|>`` and a video
``<|vision_start|><|video_pad|><|vision_end|>``. Messages use the transformers schema:
``{"role": ..., "content": str | [{"type": "text", "text": ...}, {"type": "image"}, ...]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nsa_jax.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
Message = Mapping[str, Any]


def _render_content(content: Any, counts: dict[str, int], add_vision_id: bool) -> str:
    if isinstance(content, str):
        return content
    out = []
    for item in content:
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            counts["image"] += 1
            prefix = f"Picture {counts['image']}: " if add_vision_id else ""
            out.append(f"{prefix}{VISION_START}{IMAGE_PAD}{VISION_END}")
        elif item.get("type") == "video" or "video" in item:
            counts["video"] += 1
            prefix = f"Video {counts['video']}: " if add_vision_id else ""
            out.append(f"{prefix}{VISION_START}{VIDEO_PAD}{VISION_END}")
        elif "text" in item:
            out.append(str(item["text"]))
    return "".join(out)


def _roles(messages: Sequence[Message], add_generation_prompt: bool) -> list[str]:
    """Role of every ``<|im_start|>`` that ``render_chat`` writes, in order."""
    roles = [str(m["role"]) for m in messages]
    if messages and roles[0] != "system":
        roles.insert(0, "system")
    return roles + (["assistant"] if add_generation_prompt else [])


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """The prompt text transformers' ``apply_chat_template(..., tokenize=False)`` gives for Qwen2.5-VL."""
    counts = {"image": 0, "video": 0}
    parts = []
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        content = _render_content(message["content"], counts, add_vision_id)
        parts.append(f"{IM_START}{message['role']}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def vision_tokens_per_item(grid_thw: np.ndarray | Sequence[Sequence[int]] | None, merge_size: int = 2) -> np.ndarray:
    """LLM tokens of each image or video: ``grid_t * grid_h * grid_w // merge_size**2``."""
    grid = np.asarray(grid_thw if grid_thw is not None else np.zeros((0, 3)), np.int64).reshape(-1, 3)
    return grid.prod(axis=1) // merge_size**2


def vision_pad_repeats(
    ids: Sequence[int] | np.ndarray,
    special_ids: Mapping[str, int],
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    video_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    merge_size: int = 2,
) -> np.ndarray:
    """Copies of each token in the expanded sequence: ``np.repeat(ids, repeats)`` expands it.

    The k-th ``<|image_pad|>`` (``<|video_pad|>``) becomes ``vision_tokens_per_item`` of the k-th
    image (video) grid, as ``Qwen2_5_VLProcessor`` does; other tokens are kept once. The numbers of
    pad tokens and grids must match.
    """
    ids = np.asarray(ids, np.int64)
    repeats = np.ones(len(ids), np.int64)
    for token, grid in ((IMAGE_PAD, image_grid_thw), (VIDEO_PAD, video_grid_thw)):
        where = np.flatnonzero(ids == special_ids.get(token, -1))
        per_item = vision_tokens_per_item(grid, merge_size)
        if len(where) != len(per_item):
            raise ValueError(f"{len(where)} {token} tokens but {len(per_item)} grids")
        repeats[where] = per_item
    return repeats


IGNORE = -100  # the label of a token that is not learned (Hugging Face's convention)


def assistant_mask(ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer, roles: Sequence[str]) -> np.ndarray:
    """True on the tokens of every assistant answer and its closing ``<|im_end|>`` (the label tokens).

    ``roles`` gives the role of each ``<|im_start|>`` in ``ids``. The ``assistant\\n`` header is not
    masked (a token that straddles the header and the answer counts as answer); neither is the
    newline after ``<|im_end|>``, nor an open generation prompt.
    """
    ids = np.asarray(ids, np.int64)
    starts = np.flatnonzero(ids == tokenizer.special_ids[IM_START])
    if len(starts) != len(roles):
        raise ValueError(f"{len(starts)} {IM_START} tokens for {len(roles)} turns (does a message contain {IM_START}?)")
    ends = np.flatnonzero(ids == tokenizer.special_ids[IM_END])
    mask = np.zeros(len(ids), bool)
    header = "assistant\n"
    for start, role in zip(starts, roles):
        after = ends[ends > start]
        if role != "assistant" or not len(after):
            continue
        body = start + 1
        while body < after[0] and header.startswith(tokenizer.decode(ids[start + 1 : body + 1])):
            body += 1
        mask[body : after[0] + 1] = True
    return mask


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    video_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    merge_size: int = 2,
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [L] of the rendered chat with vision pads expanded, and its assistant mask bool [L].

    The ids equal ``Qwen2_5_VLProcessor(text=render_chat(messages), images=..., videos=...)``'s
    ``input_ids`` for a tokenizer that adds no BOS/EOS (Qwen's does not).
    """
    ids = np.asarray(tokenizer.encode(render_chat(messages, add_generation_prompt, add_vision_id)), np.int64)
    mask = assistant_mask(ids, tokenizer, _roles(messages, add_generation_prompt))
    repeats = vision_pad_repeats(ids, tokenizer.special_ids, image_grid_thw, video_grid_thw, merge_size)
    return np.repeat(ids, repeats).astype(np.int32), np.repeat(mask, repeats)
