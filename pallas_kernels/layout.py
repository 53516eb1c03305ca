"""Head layouts of NSA: which KV head each query row reads, and how rows map back to query heads.

"gqa": query head h reads KV head h // G with G = HQ / HKV (SPEC §3).

"videonsa": the released 64-padded layout (SPEC §2.4), generalised. The HQ query heads are laid out as
[heads 0..HQ-1, heads 0..HQ-1 again, zero heads] = P padded heads over HKV KV heads, with padded group size
Gp = the next power of two >= ceil(2 * HQ / HKV) and P = Gp * HKV (HQ = 28, HKV = 4: Gp = 16, P = 64, as
released). Padded head p reads KV head p // Gp, selection is shared by the Gp padded heads of a group (zero
heads included: they add 1/n_visible to every past block's importance), and the output of head h is the mean
of padded heads h and h + HQ.

The kernels never build the P padded heads: they run over the 2 * HQ *virtual* rows v (query head v % HQ,
KV head v // Gv) and account for the zero heads analytically; the oracle in `reference.py` pads literally.
"""

from __future__ import annotations

import dataclasses

HEAD_LAYOUTS = ("gqa", "videonsa")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Static description of a head layout.

    num_q_heads: HQ. num_kv_heads: HKV. copies: virtual rows per query head (1 or 2).
    group_size: virtual (or padded) rows per KV head, Gv. padded_heads: P = Gv * HKV.
    Virtual row v in [0, copies * HQ) is query head v % HQ and reads KV head v // group_size.
    """

    kind: str
    num_q_heads: int
    num_kv_heads: int
    copies: int
    group_size: int

    @property
    def virtual_heads(self) -> int:
        return self.copies * self.num_q_heads

    @property
    def padded_heads(self) -> int:
        return self.group_size * self.num_kv_heads

    def rows_of_kv_head(self, kv: int) -> range:
        """Virtual rows that read KV head `kv` (the padded zero rows excluded)."""
        return range(kv * self.group_size, min((kv + 1) * self.group_size, self.virtual_heads))

    def zero_rows_of_kv_head(self, kv: int) -> int:
        """Padded zero heads in the group of KV head `kv`."""
        return self.group_size - len(self.rows_of_kv_head(kv))


def head_layout(kind: str, num_q_heads: int, num_kv_heads: int) -> HeadLayout:
    if kind not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {kind!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if kind == "gqa":
        return HeadLayout(kind, num_q_heads, num_kv_heads, 1, num_q_heads // num_kv_heads)
    group = next_pow2(-(-2 * num_q_heads // num_kv_heads))
    return HeadLayout(kind, num_q_heads, num_kv_heads, 2, group)
