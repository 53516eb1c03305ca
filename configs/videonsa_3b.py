"""A 3B-class VideoNSA at 64K tokens a sample, for multi-GPU training (fsdp + context parallel).

Sized as Qwen2.5-VL-3B: language model 36 layers, width 2048, 16 / 2 heads, MLP 11008, tied 151,936-token
embedding, NSA gates on every layer, plus the 0.67B vision tower: 3.9B parameters. One 65,536-token row:
a 1,536-frame 224x224 video (grid 768 x 16 x 16: 196,608 pixel rows -> 49,152 merged tokens) + text.
Mesh: every device on `sequence` (context parallel: activations split along tokens, attention head-parallel
over the 2 KV heads) with parameters, gradients and Adam moments sharded over it (ZeRO-3); on one GPU the
same config runs unsharded. Parameters + AdamW in float32 take ~62 GB, so one 141 GB H200 holds it.

    python -m launch.train --config=configs/videonsa_3b.py --workdir=runs/3b
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="videonsa_3b", compute_dtype="bfloat16", attention_impl="cudnn")
    c.model.nsa.update(mode="native", block_size=64, block_count=32, window_size=256)
    c.data.update(batch_size=1, seq_len=65536, video_grid=(768, 16, 16), max_patches=768 * 16 * 16,
                  text_vocab=4096)  # synthetic words from 4K ids: a loss that visibly falls in 30 steps
    c.train.update(steps=30, learning_rate=1e-4, warmup_fraction=0.1, remat="full", loss_chunk=4096, log_every=1)
    c.checkpoint.update(every=10**9, keep=1, save_last=False)
    c.mesh.update(data=1, fsdp=1, tensor=1, sequence=-1)
    return c
