"""The CPU demo: a small VideoNSA (4 layers, width 128) trained for a few minutes on 2 cores
(about 2.2 s a step of 4 x 512 tokens on 2 cores: 150 steps ~ 6 minutes)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.preset = "demo"
    c.model.nsa.update(block_size=16, block_count=4, window_size=32)
    c.data.update(batch_size=4, seq_len=512, video_grid=(8, 8, 8), max_patches=2048)
    c.train.update(steps=150, learning_rate=1e-3, warmup_fraction=0.05, end_lr_ratio=0.1, weight_decay=0.0,
                   log_every=10, loss_chunk=512, remat="none")
    c.checkpoint.update(every=100, keep=2)
    return c
