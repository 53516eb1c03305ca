"""The tokenizer of a checkpoint for prompting it (its tokenizer.json, else a byte-level fallback)."""

from __future__ import annotations

import os


def eval_tokenizer(model_dir: str, config, tokenizer_dir: str | None = None):
    """The HF tokenizer of --tokenizer, of the model directory or of the training run a workdir / checkpoint step
    directory belongs to, else a byte-level one with the config's vision ids."""
    from nsa_jax.conversion import training_tokenizer
    from nsa_jax.tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                                   ByteTokenizer, load_tokenizer)

    tok_dir = tokenizer_dir or (model_dir if os.path.exists(os.path.join(model_dir, "tokenizer.json"))
                                else training_tokenizer(model_dir))
    if tok_dir:
        return load_tokenizer(tok_dir)
    vision = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
              IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id}
    free = (i for i in range(256, config.text.vocab_size) if i not in vision.values())
    return ByteTokenizer(config.text.vocab_size, {ENDOFTEXT: next(free), IM_START: next(free), IM_END: next(free),
                                                  **vision})
