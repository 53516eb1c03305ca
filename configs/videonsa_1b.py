"""A 1B-class VideoNSA (Qwen2.5-1.5B-sized language model + the Qwen2.5-VL vision tower) for the one-GPU
train-step benchmark (SPEC §5: 32K tokens, MFU >= 40%)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="videonsa_1b", compute_dtype="bfloat16")
    c.model.nsa.update(mode="native", block_size=64, block_count=32, window_size=256)
    # 32,768 tokens per row: a 192-frame 448x448 video (grid 96 x 32 x 32 -> 24,576 merged tokens) + 8,192 text.
    c.data.update(batch_size=1, seq_len=32768, video_grid=(96, 32, 32), max_patches=96 * 32 * 32)
    c.train.update(steps=20, learning_rate=1e-5, remat="dots", loss_chunk=4096, log_every=1)
    c.checkpoint.update(every=10**9, keep=1)
    c.mesh.update(data=1, fsdp=1, tensor=1, sequence=1)
    return c
