"""The model split into (graphdef, float32 parameter dict) for training."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nsa_jax.config import ModelConfig
from nsa_jax.layers import Runtime
from nsa_jax.model import Qwen25VL
from nsa_jax.sharding import logical_rules, param_logical_axes, tree_shardings


def split_for_training(config: ModelConfig, mesh: Mesh, *, compute_dtype: str, remat: str, seed: int,
                       init_from: str = "", attention_impl: str = "",
                       sharding_rules: Mapping[str, Sequence[str]] | None = None, prefetch: bool = False
                       ) -> tuple[nnx.GraphDef, Any]:
    """(graphdef running on `mesh` with the remat policy, float32 parameters placed by the sharding rules).

    Each parameter is placed by the logical axes it declares (`sharding.param_logical_axes`) and the rules
    `sharding.LOGICAL_RULES` with `sharding_rules` (logical name -> mesh axes, `config.sharding_rules`)
    merged over them; `train_step.state_shardings` gives the optimizer state the same placement.

    attention_impl: `jax.nn.dot_product_attention` implementation of the language model's dense attention
    ("" = XLA's choice, "cudnn" = cuDNN flash attention on NVIDIA GPUs). prefetch: the decoder layers gather
    the next layer's parameters ahead (`layers.Runtime.prefetch`; remat must be "full").
    Random parameters are initialised on the host CPU and placed (on TPU: directly into their shards);
    `init_from` (HF or Orbax directory, `nsa_jax.conversion.from_pretrained`) is loaded on the host and
    replaces every parameter it holds.
    """
    dtype = jnp.dtype(compute_dtype)

    rules = logical_rules(sharding_rules)
    runtime = Runtime(mesh=mesh, remat=remat, attention_impl=attention_impl or None, prefetch=prefetch,
                      sharding_rules=tuple(rules.items()))

    def build(key: jax.Array) -> Qwen25VL:
        return Qwen25VL(config, rngs=nnx.Rngs(key), dtype=dtype, param_dtype=jnp.float32, runtime=runtime)

    key = jax.random.key(seed)
    abstract = nnx.eval_shape(build, key)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    shardings = tree_shardings(nnx.to_pure_dict(abstract_params), mesh, param_logical_axes(abstract_params),
                               rules)
    init = lambda k: nnx.to_pure_dict(nnx.state(build(k), nnx.Param))
    if jax.default_backend() == "tpu":
        params = jax.jit(init, out_shardings=shardings)(key)
    else:
        # XLA:GPU took > 8 minutes to compile this initialisation for the 1B-class preset on an H100 (XLA:CPU:
        # seconds): every process initialises the whole model on its host CPU (same key, same values), then
        # places the shards its devices hold.
        cpu = jax.local_devices(backend="cpu")[0]
        host = jax.jit(init, out_shardings=jax.sharding.SingleDeviceSharding(cpu))(jax.device_put(key, cpu))
        params = jax.tree.map(_place_from_host, host, shardings)
    if init_from:
        from nsa_jax.conversion import from_pretrained
        loaded = from_pretrained(init_from)
        if loaded.config.text != config.text or loaded.config.vision != config.vision:
            raise ValueError(f"{init_from}: its text / vision config differs from preset's")
        # A plain Qwen2.5-VL checkpoint has no NSA gates: those keep their fresh initialisation.
        params = _overlay(params, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), shardings)
    return graphdef, params


def _place_from_host(value: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with `sharding` from the whole value, which every process holds."""
    whole = np.asarray(value)
    return jax.make_array_from_callback(whole.shape, sharding, lambda index: whole[index])


def _overlay(params: dict, loaded: dict, shardings: dict) -> dict:
    """params with every leaf that `loaded` also holds replaced by the loaded value (float32, placed)."""
    out = {}
    for key, value in params.items():
        if key not in loaded:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _overlay(value, loaded[key], shardings[key])
        else:
            out[key] = jax.device_put(jnp.asarray(loaded[key], jnp.float32), shardings[key])
    return out
