"""The tokenizer of a checkpoint for prompting it (its tokenizer.json, else a byte-level fallback)."""

from __future__ import annotations

import os


def eval_tokenizer(model_dir: str, config, tokenizer_dir: str | None = None):
    """The HF tokenizer of --tokenizer, of the model directory or of the training run a workdir / checkpoint step
    directory belongs to, else a byte-level one with the config's vision ids."""
    from nsa_jax.conversion import training_tokenizer
    from nsa_jax.tokenizer import load_tokenizer_or_bytes

    tok_dir = tokenizer_dir or (model_dir if os.path.exists(os.path.join(model_dir, "tokenizer.json"))
                                else training_tokenizer(model_dir))
    return load_tokenizer_or_bytes(tok_dir, config)
