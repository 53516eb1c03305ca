"""A plain torch implementation of the released VideoNSA attention (SPEC §2), the oracle of mode `videonsa`.

Written from the release's code path with loops, independently of `pallas_kernels`: `Qwen2_5_VLMixNSA.
_mixed_attention` (lmms-eval's modeling_qwen2_5_vl.py: routing by mRoPE ids, pure dense for text-only chunks,
pure NSA for vision-only ones), `nsa_func` (ms-swift/nsa/nsa.py) with the 64-head padding done literally
(heads [0..HQ-1, 0..HQ-1, zeros]), `compression_attention`'s [B, P, T] lse buffer, which fla's
`parallel_nsa_kernel_topk` reads through a raw [B, T, P] pointer (`lse + (bos + i_t) * HQ + i_h * G`), the
non-causal compression mask, and fla's bitonic top-k network simulated step by step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ fla's bitonic top-k (lmms-eval copy)


def _compare_and_swap(x: np.ndarray, ids: np.ndarray, flip: np.ndarray, i: int, n_dims: int):
    n = x.shape[0]
    stride = 2 ** (n_dims - i - 1)
    x, ids = x.copy(), ids.copy()
    for a in range(n):
        if (a // stride) % 2:
            continue  # handle each pair once, from its left element
        b = a + stride
        left, right = x[a], x[b]
        if (left > right) != bool(flip[a]):
            x[a], x[b] = x[b], x[a]
            ids[a], ids[b] = ids[b], ids[a]
    return x, ids


def _bitonic_merge(x, ids, stage: int, order, n_dims: int):
    n = x.shape[0]
    if order == 2:
        flip = (np.arange(n) // (2**stage)) % 2
    else:
        flip = np.full(n, int(bool(order)))
    for i in range(stage):
        x, ids = _compare_and_swap(x, ids, flip, i + (n_dims - stage), n_dims)
    return x, ids


def fla_topk(scores: np.ndarray, current: int, chunk: int, count: int) -> list[int]:
    """Block indices fla's `parallel_nsa_kernel_topk` keeps for one query and KV head.

    scores: importance of blocks 0..current (index `current` is the query's own block); chunk: blocks sorted
    per bitonic pass (BC = block size); count: S = next power of two of the block count. Returns the kept
    block indices (the -1 entries dropped), in the network's output order.
    """
    n_dims = int(math.log2(chunk))
    half = np.arange(chunk) < chunk // 2
    b_i = np.full(chunk, -1.0, np.float32)
    o_i = np.zeros(chunk, np.int64)
    for start in range(0, current + 1, chunk):
        o_c = start + np.arange(chunk)
        new_b = np.array([scores[c] if c <= current else 0.0 for c in o_c], np.float32)
        new_o = np.where(o_c <= current, o_c + 1, 0)
        b_ip, o_ip = b_i, o_i
        b_i, o_i = new_b, new_o
        for i in range(1, n_dims):
            b_i, o_i = _bitonic_merge(b_i, o_i, i, 2, n_dims)
        if start != 0:
            b_i, o_i = _bitonic_merge(b_i, o_i, n_dims, False, n_dims)
            b_i = np.where(half, b_ip, b_i).astype(np.float32)
            o_i = np.where(half, o_ip, o_i)
            b_i, o_i = _bitonic_merge(b_i, o_i, n_dims, True, n_dims)
        else:
            b_i, o_i = _bitonic_merge(b_i, o_i, n_dims, True, n_dims)
    return [int(o) - 1 for o in o_i[:count] if o > 0]


# ------------------------------------------------------------------ the NSA branch, 64-head layout


def padded_heads(hq: int, hkv: int) -> int:
    """Padded head count: HKV * next power of two of ceil(2*HQ / HKV) (64 for 28 / 4)."""
    per = -(-2 * hq // hkv)
    return hkv * (1 << (per - 1).bit_length())


def nsa_videonsa(q, k, v, g_cmp, g_slc, g_swa, *, block_size: int, block_count: int, window: int,
                 lse_reading: str = "released"):
    """Released NSA over q [B,T,HQ,D], k, v [B,T,HKV,D], gates [B,T,HQ] (float64 math, but the top-k's
    operands rounded to the input dtype as fla's kernel rounds them) -> [B,T,HQ,D].

    lse_reading "released": the top-k reads the compression lse buffer [B, P, T] as [B, T, P] (a view of the
    same memory, as fla's kernel does through its pointer); "per_head": each head's own lse.
    """
    dtype = q.dtype  # fla's top-k rounds q * scale and its block means to it
    q, k, v = q.double(), k.double(), v.double()
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    p = padded_heads(hq, hkv)
    gp = p // hkv
    pad = lambda x: torch.cat([x, x, torch.zeros(*x.shape[:2], p - 2 * hq, *x.shape[3:], dtype=x.dtype)], 2)
    qp, gates = pad(q), [pad(g.double()) for g in (g_cmp, g_slc, g_swa)]
    scale = d**-0.5
    nb = -(-t // block_size)
    kc = torch.stack([k[:, j * block_size:(j + 1) * block_size].mean(1) for j in range(nb)], 1)  # [B,NB,HKV,D]
    vc = torch.stack([v[:, j * block_size:(j + 1) * block_size].mean(1) for j in range(nb)], 1)
    # Compression branch: o [B, T, P, D] and flex_attention's lse buffer [B, P, T].
    o_cmp = torch.zeros(b, t, p, d, dtype=torch.float64)
    lse_buffer = torch.zeros(b, p, t, dtype=torch.float64)
    for bi in range(b):
        for i in range(t):
            visible = [j for j in range(nb) if i <= (j + 1) * block_size - 1]  # released, not causal
            for h in range(p):
                s = scale * kc[bi, visible, h // gp] @ qp[bi, i, h]
                lse_buffer[bi, h, i] = torch.logsumexp(s, 0)
                o_cmp[bi, i, h] = torch.softmax(s, 0) @ vc[bi, visible, h // gp]
    if lse_reading == "released":
        lse_read = lse_buffer.contiguous().view(b, t, p)  # the pointer arithmetic of parallel_nsa_kernel_topk
    else:
        lse_read = lse_buffer.transpose(1, 2)
    count = 1 << (block_count - 1).bit_length()
    q_topk, kc_topk = (qp * scale).to(dtype).double(), kc.to(dtype).double()
    out = torch.zeros(b, t, p, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(t):
            cur = i // block_size
            for kv in range(hkv):
                heads = range(kv * gp, (kv + 1) * gp)
                scores = np.zeros(cur + 1, np.float32)
                for h in heads:
                    for j in range(cur):
                        s = kc_topk[bi, j, kv] @ q_topk[bi, i, h] - lse_read[bi, i, h]
                        scores[j] += float(torch.exp(s).detach())
                    scores[cur] += 1.0
                chosen = fla_topk(scores, cur, block_size, count)
                keys = sorted(x for j in chosen for x in range(j * block_size, min((j + 1) * block_size, t))
                              if x <= i)
                win = list(range(max(0, i - window + 1), i + 1))
                for h in heads:
                    o_slc = torch.softmax(scale * k[bi, keys, kv] @ qp[bi, i, h], 0) @ v[bi, keys, kv]
                    o_swa = torch.softmax(scale * k[bi, win, kv] @ qp[bi, i, h], 0) @ v[bi, win, kv]
                    out[bi, i, h] = (gates[0][bi, i, h] * o_cmp[bi, i, h] + gates[1][bi, i, h] * o_slc
                                     + gates[2][bi, i, h] * o_swa)
    return ((out[:, :, :hq] + out[:, :, hq:2 * hq]) / 2)


# ------------------------------------------------------------------ the hybrid layer on an HF attention module


def rotary(x, cos, sin, mrope_section):
    """transformers' multimodal rotary on x [B,H,T,D] with cos/sin [3,B,T,D]."""
    sec = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sec, -1))], -1).unsqueeze(1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sec, -1))], -1).unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def dense(q, k, v, hq: int):
    """Causal GQA of q [B, T, HQ, D] over k, v [B, S, HKV, D] (the queries are the last T keys) -> [B, T, HQ, D]."""
    t, s, hkv = q.shape[1], k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, 2).transpose(1, 2)
    vv = v.repeat_interleave(hq // hkv, 2).transpose(1, 2)
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask).transpose(1, 2)


def _qkv(attn, hidden, cos, sin, cache):
    """Rotated q [B, T, HQ, D] and the keys, values [B, S, HKV, D] of the cache with the chunk appended."""
    b, t, _ = hidden.shape
    hq, hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    d = attn.head_dim
    q = attn.q_proj(hidden).view(b, t, hq, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, hkv, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(b, t, hkv, d).transpose(1, 2)
    section = attn.rope_scaling["mrope_section"]
    q, k = rotary(q, cos, sin, section), rotary(k, cos, sin, section)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
        cache["k"], cache["v"] = k, v
    return q, k, v


def native_layer(attn, hidden, cos, sin, vision, nsa: dict, cache: dict | None = None):
    """SPEC §3's layer (mode native) on an HF attention module with gates: the vision tokens [B, T] (image /
    video pads) through NSA over them alone (gathered, causal compression, GQA: `numpy_nsa`, the numpy loops of
    tests/references/numpy_nsa.py), the text rows dense; a chunk with no vision token (a decode step) attends
    densely to the whole cache."""
    from tests.references.numpy_nsa import numpy_nsa

    b, t, _ = hidden.shape
    hq = attn.config.num_attention_heads
    q, k, v = _qkv(attn, hidden, cos, sin, cache)
    out = dense(q, k, v, hq)
    if vision.any():
        assert k.shape[1] == t, "the NSA branch runs on a whole (uncached) sequence"
        gates = (attn.g_proj_2(F.gelu(attn.g_proj_1(hidden))).view(b, t, hq, 3) / nsa["gate_temperature"]).sigmoid()
        for row in range(b):
            idx = torch.nonzero(vision[row])[:, 0]
            g = gates[row:row + 1, idx].detach().numpy()
            o = numpy_nsa(*(x[row:row + 1, idx].detach().numpy() for x in (q, k, v)), g[..., 0], g[..., 1],
                          g[..., 2], bs=nsa["block_size"], count=nsa["block_count"], window=nsa["window_size"],
                          seg=None, causal=True, layout="gqa", tie="recent")
            out[row, idx] = torch.from_numpy(o[0]).to(out.dtype)
    return attn.o_proj(out.reshape(b, t, -1))


def videonsa_layer(attn, hidden, cos, sin, position_ids, nsa: dict, cache: dict | None = None):
    """The released `Qwen2_5_VLMixNSA` forward on an HF attention module with `g_proj_1`/`g_proj_2` added.

    cache: {"k": [B, S, HKV, D], "v": ...} of the tokens before `hidden` (HF's DynamicCache of this layer), or
    None; the chunk's rotated k, v are appended to it (the caller keeps the dict), and attention runs over the
    whole cache as the release's does: a chunk with no vision token takes the pure dense path
    (`_pure_flash_attention`), one of vision tokens only the pure NSA path, a mixed one the hybrid.
    """
    b, t, _ = hidden.shape
    hq, d = attn.config.num_attention_heads, attn.head_dim
    q, k, v = _qkv(attn, hidden, cos, sin, cache)
    vision = ~((position_ids[0] == position_ids[1]) & (position_ids[0] == position_ids[2]))  # [B, T]

    if not vision.any():
        out = dense(q, k, v, hq)
    else:
        assert k.shape[1] == t, "the release's mixed and NSA paths run on a whole (uncached) sequence"
        gates = attn.g_proj_2(F.gelu(attn.g_proj_1(hidden))).view(b, t, hq, 3) / nsa["gate_temperature"]
        nsa_kw = dict(block_size=nsa["block_size"], block_count=nsa["block_count"], window=nsa["window_size"],
                      lse_reading=nsa.get("lse_reading", "released"))
        if vision.all():
            g = gates.sigmoid()
            out = nsa_videonsa(q, k, v, g[..., 0], g[..., 1], g[..., 2], **nsa_kw).to(q.dtype)
        else:
            gates = torch.where(vision[..., None, None], gates, torch.zeros_like(gates)).sigmoid()
            vm = vision[..., None, None]
            o_nsa = nsa_videonsa(torch.where(vm, q, 0), torch.where(vm, k, 0), torch.where(vm, v, 0),
                                 gates[..., 0], gates[..., 1], gates[..., 2], **nsa_kw).to(q.dtype)
            out = o_nsa + dense(torch.where(vm, torch.zeros_like(q), q), k, v, hq)  # vision rows of q zeroed
    return attn.o_proj(out.reshape(b, t, hq * d))


# ------------------------------------------------------------------ a tiny released-style checkpoint


def videonsa_checkpoint(path, cfg, nsa: dict, seed: int = 0, mode: str = "videonsa"):
    """A tiny random HF model whose attention is the release's (`videonsa_layer`; mode "native": `native_layer`)
    with gates added (weights far from 0), saved to `path` with the NSA fields in config.json. Returns (hf model,
    state): set state["pos"] to the mRoPE ids [3, B, T] of each call (mode native: state["vision"], the vision
    tokens [B, T]); state["caches"] = {} makes every layer keep its k, v across calls (HF's
    DynamicCache), state["caches"] = None runs without a cache."""
    import json
    import types

    from tests.references.hf_reference import hf_model

    hf = hf_model(cfg, seed=seed)
    state = {"caches": None, "nsa": dict(nsa)}
    torch.manual_seed(seed + 1)
    for layer in hf.model.language_model.layers:
        attn = layer.self_attn
        hidden = cfg.text.hidden_size
        attn.g_proj_1 = torch.nn.Linear(hidden, hidden)
        attn.g_proj_2 = torch.nn.Linear(hidden, cfg.text.num_attention_heads * 3)
        for p in (*attn.g_proj_1.parameters(), *attn.g_proj_2.parameters()):
            torch.nn.init.normal_(p, std=0.3)  # gates far from 0.5, so each branch's weight matters

        def forward(self, hidden_states, position_embeddings=None, **kw):
            caches = state["caches"]
            cache = None if caches is None else caches.setdefault(self.layer_idx, {})
            if mode == "native":
                return native_layer(self, hidden_states, *position_embeddings, state["vision"], state["nsa"],
                                    cache), None
            return videonsa_layer(self, hidden_states, *position_embeddings, state["pos"], state["nsa"], cache), None

        attn.forward = types.MethodType(forward, attn)
    hf.save_pretrained(path)
    with open(path / "config.json") as f:
        d = json.load(f)
    d.update(nsa_mode=mode, nsa_block_size=nsa["block_size"], nsa_block_count=nsa["block_count"],
             nsa_window_size=nsa["window_size"])
    if mode == "videonsa":
        d["nsa_videonsa_lse"] = nsa.get("lse_reading", "released")
    (path / "config.json").write_text(json.dumps(d))
    return hf, state
