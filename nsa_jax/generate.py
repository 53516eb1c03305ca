"""Sampling loop over the model's KV cache: `Qwen25VL.prefill` once per prompt, then `decode_step` per token.

As the released VideoNSA decodes (SPEC §2.12, HF `generate(use_cache=True)`): the prefill runs every layer's
own attention over the prompt (the VideoNSA hybrid in NSA layers) and the first answer token comes from its last
row; each later token attends densely to the cache in every mode. Prompts of one call are prefilled one at a
time (mode videonsa at their exact length, other modes padded to a multiple of `BUCKET`) and decoded together;
the cache length is a multiple of `BUCKET`, so compiled steps are reused across prompt lengths.
Generated text gets mRoPE ids max(prompt ids) + 1 + step on all three axes (transformers' rope_deltas).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.model import KVCache, Qwen25VL, VisionInput
from nsa_jax.processing import get_rope_index
from nsa_jax.vision import vision_layout

BUCKET = 64  # padded prompt and cache lengths are multiples of this


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
    """The vision inputs of one prompt: pixel rows and grids as the processor returns them."""

    pixel_values_videos: np.ndarray | None = None  # [N, patch_dim]
    video_grid_thw: np.ndarray | None = None  # [n, 3]
    second_per_grid_ts: Sequence[float] | None = None
    pixel_values: np.ndarray | None = None  # images
    image_grid_thw: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise softmax(logits / temperature) over the smallest set of tokens
    whose probability reaches top_p, drawn with keys from `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's continuation: tokens (an EOS included), the logits each was drawn from (float32
    [n, vocab], if asked for) and the text cut before the first stop string (if a detokenizer was given)."""

    tokens: np.ndarray
    logits: np.ndarray | None = None
    text: str | None = None


def _bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


@functools.lru_cache(maxsize=8)
def _compiled(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
    """The jitted prefill and decode step of a model structure. The graph definition is closed over, not a
    static argument, so it is hashed once per `generate` call, not at every decode step (~6 ms for a 7B model's,
    on this project's CPU machine: a large share of a step's budget)."""

    def prefill(state, cache_len: int, ids, positions, length, images, videos):
        model = nnx.merge(graphdef, state)
        return model.prefill(ids, positions, length, model.init_cache(ids.shape[0], cache_len), images=images,
                             videos=videos)

    def step(state, tokens, positions, cache: KVCache):
        return nnx.merge(graphdef, state).decode_step(tokens, positions, cache)

    return jax.jit(prefill, static_argnums=1), jax.jit(step, donate_argnums=3)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def _choose(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [B] from logits [B, vocab]."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(order, -1)
        before = jnp.cumsum(probs, -1) - probs  # the probability mass ranked above each token
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _vision_inputs(model: Qwen25VL, vision: VisionPrompt) -> tuple[VisionInput | None, VisionInput | None]:
    vc = model.config.vision
    images = videos = None
    if vision.pixel_values is not None:
        images = VisionInput(jnp.asarray(vision.pixel_values), vision_layout(vision.image_grid_thw, vc))
    if vision.pixel_values_videos is not None:
        videos = VisionInput(jnp.asarray(vision.pixel_values_videos), vision_layout(vision.video_grid_thw, vc))
    return images, videos


def _cut(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """text cut at each stop string in turn (`text.split(s)[0]`, as lmms-eval's wrappers cut), and whether one
    occurred."""
    hit = False
    for s in stop_strings:
        if s and s in text:
            text, hit = text.split(s)[0], True
    return text, hit


class Decoder:
    """A model's jitted prefill and decode step (the functions `generate` loops over; `launch.bench_generate`
    times them)."""

    def __init__(self, model: Qwen25VL):
        self.model = model
        graphdef, self.state = nnx.split(model)
        self._prefill, self._step = _compiled(graphdef)

    def prefill(self, prompts: Sequence[tuple[Sequence[int] | np.ndarray, VisionPrompt]], max_new_tokens: int
                ) -> tuple[jax.Array, KVCache, np.ndarray]:
        """Prompts (token ids [T], vision inputs), each prefilled alone into a cache with room for
        max_new_tokens more: (logits [B, vocab] of each prompt's last token, the cache, each prompt's first free
        mRoPE id [B])."""
        model, cfg = self.model, self.model.config
        rows = []
        for ids, vision in prompts:
            ids = np.asarray(ids, np.int32).reshape(1, -1)
            pos, _ = get_rope_index(ids, cfg, image_grid_thw=vision.image_grid_thw,
                                    video_grid_thw=vision.video_grid_thw,
                                    second_per_grid_ts=vision.second_per_grid_ts)
            rows.append((ids, np.asarray(pos, np.int32), vision))
        padded = [ids.shape[1] if model.exact_prefill else _bucket(ids.shape[1]) for ids, _, _ in rows]
        cache_len = _bucket(max(padded) + max_new_tokens)
        logits, caches = [], []
        for (ids, pos, vision), n in zip(rows, padded):
            pad = n - ids.shape[1]
            out = self._prefill(self.state, cache_len, jnp.asarray(np.pad(ids, ((0, 0), (0, pad)))),
                           jnp.asarray(np.pad(pos, ((0, 0), (0, 0), (0, pad)), mode="edge")),
                           jnp.asarray([ids.shape[1]], jnp.int32), *_vision_inputs(model, vision))
            logits.append(out[0])
            caches.append(out[1])
        cache = caches[0] if len(caches) == 1 else KVCache.concatenate(caches)
        next_ids = np.asarray([int(pos.max()) + 1 for _, pos, _ in rows], np.int32)
        return jnp.concatenate(logits, 0), cache, next_ids

    def step(self, tokens: jax.Array, positions: np.ndarray, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Tokens [B] at mRoPE ids positions [B] (all three axes) appended: (logits [B, vocab], the cache,
        which is donated: the one passed in is gone)."""
        positions = jnp.asarray(np.broadcast_to(np.asarray(positions, np.int32), (3, len(positions))))
        return self._step(self.state, tokens, positions, cache)


def generate(model: Qwen25VL, prompts: Sequence[tuple[Sequence[int] | np.ndarray, VisionPrompt]], *,
             max_new_tokens: int, eos_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
             detokenize: Callable[[Sequence[int]], str] | None = None, sampling: Sampling = Sampling(),
             return_logits: bool = False) -> list[Generation]:
    """Continuations of prompts (token ids [T], vision inputs), decoded together; a row stops after an EOS
    token, once its text (by `detokenize`) holds a stop string, or after max_new_tokens."""
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function")
    if max_new_tokens <= 0 or not prompts:
        vocab = model.config.text.vocab_size
        return [Generation(np.zeros(0, np.int32), np.zeros((0, vocab), np.float32) if return_logits else None,
                           "" if detokenize else None) for _ in prompts]
    decoder = Decoder(model)
    logits, cache, next_ids = decoder.prefill(prompts, max_new_tokens)
    key = jax.random.key(sampling.seed)
    eos = {int(e) for e in eos_token_ids}
    tokens: list[list[int]] = [[] for _ in prompts]
    scores: list[list[np.ndarray]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        chosen = _choose(logits, jax.random.fold_in(key, step), temperature=sampling.temperature,
                         top_p=sampling.top_p)
        host, host_logits = np.asarray(chosen), np.asarray(logits, np.float32) if return_logits else None
        for b in range(len(prompts)):
            if done[b]:
                continue
            tokens[b].append(int(host[b]))
            if return_logits:
                scores[b].append(host_logits[b])
            done[b] = int(host[b]) in eos or (bool(stop_strings) and _cut(detokenize(tokens[b]), stop_strings)[1])
        if all(done) or step == max_new_tokens - 1:
            break
        logits, cache = decoder.step(chosen, next_ids + step, cache)
    results = []
    for b in range(len(prompts)):
        text = _cut(detokenize(tokens[b]), stop_strings)[0] if detokenize else None
        logit_rows = np.stack(scores[b]) if return_logits else None
        results.append(Generation(np.asarray(tokens[b], np.int32), logit_rows, text))
    return results


def answer(model: Qwen25VL, tokenizer, vision: VisionPrompt, text: str, *, max_new_tokens: int,
           stop_strings: Sequence[str] = ()) -> str:
    """The model's greedy answer to `text` about the video of `vision`, as the lmms-eval VideoNSA wrapper takes it:
    the chat template with the video before the text and a generation prompt; generation stops at the
    tokenizer's end-of-turn token <|im_end|> (the wrapper passes `eos_token_id=tokenizer.eos_token_id`, which
    replaces the checkpoint's list) or a stop string; special tokens are dropped from the text, which is not
    stripped."""
    from nsa_jax.chat import encode_chat
    from nsa_jax.tokenizer import IM_END

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    ids, _ = encode_chat(tokenizer, messages, video_grid_thw=vision.video_grid_thw,
                         merge_size=model.config.vision.spatial_merge_size, add_generation_prompt=True)
    eos = [tokenizer.special_ids[IM_END]]
    stop_strings = [s for s in stop_strings if s != "\n\n"]  # the wrapper drops this one from `until`
    detokenize = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)
    out = generate(model, [(ids, vision)], max_new_tokens=max_new_tokens, eos_token_ids=eos,
                   stop_strings=stop_strings, detokenize=detokenize)[0]
    return out.text
