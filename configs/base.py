"""Fields shared by every training config; the named configs change what differs."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny",  # a model variant of nsa_jax.config.MODEL_PRESETS (tiny, demo, videonsa_1b, ...)
        init_from="",  # HF safetensors directory or Orbax directory; "" = random initialisation
        compute_dtype="float32",  # activations / matmuls; parameters (master weights) stay float32
        attention_impl="",  # dense attention: "" = XLA's choice, "cudnn" = cuDNN flash attention (GPU)
        nsa=ml_collections.ConfigDict(dict(mode="videonsa", block_size=64, block_count=32, window_size=256,
                                           gate_temperature=0.3, impl="auto", selection="token",
                                           videonsa_lse="released",
                                           layers=ml_collections.config_dict.placeholder(tuple))),
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # "synthetic" (nsa_jax.training.synthetic_data) or "shards" (data/pipeline.py)
        shards_dir="",  # shards: a launch/predecode.py output directory
        tokenizer="",  # shards: an HF tokenizer directory; "" = model.init_from's, else the byte-level fallback
        batch_size=8,  # global rows per micro-batch
        samples_per_row=1,  # shards: samples packed into one row (segment ids keep them apart)
        seq_len=128,
        video_grid=(2, 4, 4),  # synthetic: (t, h, w) patches of each row's video
        max_patches=256,  # pixel rows per micro-batch after padding
        poison_steps=(),  # synthetic: steps whose pixels are NaN (tests the non-finite guard)
        text_vocab=0,  # synthetic: prompt words drawn from ids 1 .. text_vocab - 1 (0 = all text ids)
        too_long="skip",  # shards: a sample over seq_len / max_patches is skipped, or "truncate"d to seq_len tokens
        max_skip_fraction=0.05,  # shards: stop once more than this fraction of the samples drawn was skipped
        seed=0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=100, grad_accum=1, learning_rate=1e-4, warmup_fraction=0.1, end_lr_ratio=0.0,
        weight_decay=0.01, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        freeze="",  # comma-separated among vision_tower, merger, llm
        remat="full",  # "none", "full", "dots" or "attention" (full, keeping attention residuals: nsa_jax/layers.py)
        # Gather the next decoder layer's parameters / reduce-scatter the last one's gradient while a layer
        # computes (nsa_jax/layer_scan.py); needs remat "full"
        prefetch_params=False,
        loss_chunk=2048,  # tokens per chunk of the LM head + cross entropy
        max_bad_steps=5,  # abort after this many consecutive non-finite steps
        seed=0, log_every=10,
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every=500, keep=3, async_save=True,
        save_last=True,  # also save after the last step (off for benchmark runs of large models)
        resume_from_step=-1,  # -1: the latest checkpoint (if any); N: that step
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    # Logical axis -> mesh axes, merged over nsa_jax.sharding.LOGICAL_RULES (empty: those); only parameter axes
    # (vocab, embed, heads, kv_heads, mlp), e.g. c.sharding_rules.mlp = () keeps MLP weights whole on each
    # tensor-parallel device.
    c.sharding_rules = ml_collections.ConfigDict()
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=-1, process_id=-1,  # empty: auto-detect (SLURM, TPU pods)
    ))
    c.peak_flops_per_device = -1.0  # for MFU; -1 = from the device kind (nsa_jax.training.flops)
    return c
