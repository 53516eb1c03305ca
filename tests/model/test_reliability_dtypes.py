"""Issue 21, item 10(c): a tensor stored in another dtype than the rest of its checkpoint (a float16 tensor in
a float32 checkpoint) is named in a warning and loaded in the checkpoint's dtype; uniform ones load silently."""

from __future__ import annotations

import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from nsa_jax import from_pretrained, init_model, save_hf, save_orbax, tiny_config

KEY = "model.layers.0.mlp.up_proj.weight"  # the HF name of the tensor made float16
NNX_KEY = "language_model.layers.0.mlp.up_proj.kernel"


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_float16_tensor_in_float32_hf_checkpoint(tmp_path):
    save_hf(init_model(tiny_config(), seed=0), str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a uniform checkpoint loads without a word
        from_pretrained(str(tmp_path))
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    tensors[KEY] = tensors[KEY].astype(np.float16)
    save_file(tensors, file, metadata={"format": "pt"})

    with pytest.warns(UserWarning, match=rf"{tmp_path}: 1 tensors are not float32 .*{KEY} \(float16\).*loaded as "
                                         r"float32"):
        model = from_pretrained(str(tmp_path))
    params = _params(model)
    assert {v.dtype for v in params.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params[NNX_KEY], tensors[KEY].astype(np.float32).T)
    with pytest.warns(UserWarning, match=rf"{KEY} \(float16\).*loaded as bfloat16"):
        assert {v.dtype for v in _params(from_pretrained(str(tmp_path), dtype=jnp.bfloat16)).values()} == {
            jnp.dtype(jnp.bfloat16)}


def test_float16_tensor_in_float32_orbax_checkpoint(tmp_path):
    model = init_model(tiny_config(), seed=0)
    layer = model.language_model.layers[0].mlp.up_proj
    layer.kernel.set_value(layer.kernel[...].astype(jnp.float16))
    save_orbax(model, str(tmp_path / "orbax"))
    with pytest.warns(UserWarning, match=rf"params: 1 tensors are not float32 .*{NNX_KEY} \(float16\)"):
        params = _params(from_pretrained(str(tmp_path / "orbax")))
    assert {v.dtype for v in params.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params[NNX_KEY], np.asarray(layer.kernel[...], np.float32))
