"""VideoNSA's recipe (SPEC §1): Qwen2.5-VL-7B-Instruct + NSA on every language layer, end to end.

lr 1e-6, 10% warmup then cosine, weight decay 0.01, grad clip 1.0, bf16 compute (float32 master
weights), 65,536-token rows, NSA block 64 / 32 selected blocks / window 256 in the released `videonsa`
mode. The paper used sequence parallel 8 (Ulysses) and ZeRO-2; here: --config.mesh.sequence=8 and fsdp
over the rest. Sequence 8 does not divide the 4 KV heads, so attention splits its query tokens 8 ways (each
device its chunk against the all-gathered keys, `nsa_jax/head_parallel.py`), in both modes; with tensor=4 x
sequence=2 mode native splits heads over tensor instead. Set `model.init_from`
to the converted Qwen2.5-VL-7B-Instruct (launch/convert.py) and `train.freeze` to e.g. "vision_tower" or
"vision_tower,merger" to freeze parts.
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="qwen25vl_7b", compute_dtype="bfloat16", init_from="", attention_impl="cudnn")
    c.model.nsa.update(mode="videonsa", block_size=64, block_count=32, window_size=256, gate_temperature=0.3)
    c.data.update(batch_size=8, seq_len=65536, max_patches=4 * 60000, video_grid=(176, 16, 16))
    c.train.update(steps=27000, learning_rate=1e-6, warmup_fraction=0.1, end_lr_ratio=0.0, weight_decay=0.01,
                   grad_clip=1.0, remat="full", loss_chunk=4096, log_every=10, freeze="")
    c.checkpoint.update(every=500, keep=3)
    c.mesh.update(data=1, fsdp=-1, tensor=1, sequence=8)
    return c
