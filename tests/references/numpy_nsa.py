"""NSA written as plain per-row numpy loops in float64 (SPEC §2-4), sharing no code with `pallas_kernels`: the
oracle of the jnp reference (tests/kernels/test_nsa_reference.py) and of the native branch of
`videonsa_torch_reference`."""

import math

import numpy as np


def _softmax_rows(s):
    m = s.max()
    e = np.exp(s - m)
    return e / e.sum(), m + math.log(e.sum())


def numpy_nsa(q, k, v, gc, gs, gw, *, bs, count, window, seg, causal, layout, tie, query_block=False):
    """Per-row loops in float64, written from SPEC §2-4 without sharing code with the package. query_block:
    one chosen set per block of bs queries, by their importance summed (SPEC §4's opt-in)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    gates = [np.asarray(g, np.float64) for g in (gc, gs, gw)]
    b_, t_, hq, d = q.shape
    hkv = k.shape[2]
    if layout == "gqa":
        heads = [(h, 1.0) for h in range(hq)]  # padded head p -> (query head or None, copy weight)
        gp = hq // hkv
    else:
        gp = 1 << (math.ceil(2 * hq / hkv) - 1).bit_length()
        heads = [(p % hq, 0.5) if p < 2 * hq else (None, 0.0) for p in range(gp * hkv)]
    scale = d ** -0.5
    nb = -(-t_ // bs)
    out = np.zeros((b_, t_, hq, d))
    for b in range(b_):
        sg = np.zeros(t_, int) if seg is None else np.asarray(seg[b])
        start = [max(s for s in range(i + 1) if s == 0 or sg[s] != sg[s - 1]) for i in range(t_)]
        kc = np.stack([k[b, j * bs:(j + 1) * bs].mean(0) for j in range(nb)])
        vc = np.stack([v[b, j * bs:(j + 1) * bs].mean(0) for j in range(nb)])
        o_cmp, lse = {}, {}
        for p, (h, _) in enumerate(heads):
            kv = p // gp
            for i in range(t_):
                qv = q[b, i, h] if h is not None else np.zeros(d)
                vis = [j for j in range(nb) if sg[j * bs] == sg[i]
                       and (((j + 1) * bs - 1 <= i) if causal else (i <= (j + 1) * bs - 1))]
                if not vis:
                    o_cmp[p, i], lse[p, i] = np.zeros(d), -np.inf
                    continue
                w, lse[p, i] = _softmax_rows(np.array([qv @ kc[j, kv] * scale for j in vis]))
                o_cmp[p, i] = sum(wj * vc[j, kv] for wj, j in zip(w, vis))
        chosen, imps = {}, {}
        for kv in range(hkv):
            group = range(kv * gp, (kv + 1) * gp)
            for i in range(t_):
                imps[i] = {}
                for j in range(start[i] // bs, i // bs):
                    tot = 0.0
                    for p in group:
                        h = heads[p][0]
                        qv = q[b, i, h] if h is not None else np.zeros(d)
                        if np.isfinite(lse[p, i]):
                            tot += math.exp(qv @ kc[j, kv] * scale - lse[p, i])
                    imps[i][j] = tot
            for i in range(t_):
                cur = i // bs
                imp = imps[i]
                if query_block:  # every query of the block has the same past blocks
                    block = range(cur * bs, min((cur + 1) * bs, t_))
                    imp = {j: sum(imps[i2][j] for i2 in block) for j in imp}
                if tie == "recent":
                    past = sorted(imp, key=lambda j: (-imp[j], -j))
                    chosen[kv, i] = {cur, *past[:count - 1]}
                else:  # without ties fla's network keeps the highest scores; the current block scores gp
                    imp[cur] = float(gp)
                    chosen[kv, i] = set(sorted(imp, key=lambda j: -imp[j])[:count])
        for p, (h, wcopy) in enumerate(heads):
            if h is None:
                continue
            kv = p // gp
            for i in range(t_):
                keys_slc = [j for j in range(start[i], i + 1) if j // bs in chosen[kv, i]]
                keys_swa = [j for j in range(max(start[i], i - window + 1), i + 1)]
                res = gates[0][b, i, h] * o_cmp[p, i]
                for keys, g in ((keys_slc, gates[1][b, i, h]), (keys_swa, gates[2][b, i, h])):
                    w, _ = _softmax_rows(np.array([q[b, i, h] @ k[b, j, kv] * scale for j in keys]))
                    res = res + g * sum(wj * v[b, j, kv] for wj, j in zip(w, keys))
                out[b, i, h] += wcopy * res
    return out
