"""A 1B-class VideoNSA for the one-GPU train-step benchmark (SPEC §5: 32K tokens, MFU >= 40%).

Language model sized as Qwen2.5-1.5B (28 layers, width 1536, 12 / 2 heads, MLP 8960, tied 151,936-token
embedding: 1.54B) with NSA gates, plus the Qwen2.5-VL vision tower (0.67B): 2.28B parameters in all.
Full remat: float32 weights, gradients and Adam moments take ~36 GB of the H100's 80.
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(preset="videonsa_1b", compute_dtype="bfloat16", attention_impl="cudnn")
    c.model.nsa.update(mode="native", block_size=64, block_count=32, window_size=256)
    # 32,768 tokens per row: a 384-frame video at the paper's 224x224 (grid 192 x 16 x 16 = 49,152 pixel rows
    # -> 12,288 merged tokens) + 20,480 text tokens.
    c.data.update(batch_size=1, seq_len=32768, video_grid=(192, 16, 16), max_patches=192 * 16 * 16)
    c.train.update(steps=20, learning_rate=1e-5, remat="full", loss_chunk=4096, log_every=1)
    c.checkpoint.update(every=10**9, keep=1)
    c.mesh.update(data=1, fsdp=1, tensor=1, sequence=1)
    return c
