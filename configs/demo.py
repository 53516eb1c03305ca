"""The CPU demo (`launch/demo.py`): a small VideoNSA (4 layers, width 128) trained for a few minutes on 2 cores.

Its batches hold 8 single-question samples of one 16-frame 56 x 56 video each ((8, 4, 4) patch grid: 128
pixel rows, 32 vision tokens) and at most 192 tokens (an open question about the video and its answer): about
0.4 s a step on 2 cores, 500 steps ~ 3.5 minutes.
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.preset = "demo"
    c.model.nsa.update(block_size=16, block_count=4, window_size=32)
    # Pixel rows are exactly what 8 such videos have: padding rows would cost the vision tower as much as real ones.
    c.data.update(batch_size=8, seq_len=192, video_grid=(8, 4, 4), max_patches=8 * 128)
    c.train.update(steps=500, learning_rate=5e-4, warmup_fraction=0.05, end_lr_ratio=0.1, weight_decay=0.0,
                   log_every=50, loss_chunk=512, remat="none")
    c.checkpoint.update(every=500, keep=1)
    return c
