"""A tiny VideoNSA (2 layers, width 64) on synthetic batches: the tests' config (CPU, seconds)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.nsa.update(block_size=8, block_count=2, window_size=16)
    c.data.update(batch_size=8, seq_len=64, video_grid=(2, 4, 4), max_patches=288)
    c.train.update(steps=8, learning_rate=1e-3, log_every=1, loss_chunk=32)
    c.checkpoint.update(every=2, keep=3)
    return c
