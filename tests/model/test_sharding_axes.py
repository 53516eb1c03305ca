"""Parameter sharding from the logical axes each weight declares where it is created (issue 20): the same
PartitionSpecs as the path-fragment table it replaced, for every parameter of the tiny, demo and 7B presets;
every nnx.Param declares its axes; loading keeps them; a config's `sharding_rules` changes the placement."""

from __future__ import annotations

import json
import sys

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nsa_jax.config import NSAConfig, model_preset
from nsa_jax.model import Qwen25VL
from nsa_jax.sharding import (LOGICAL_RULES, declared_axes, logical_rules, logical_to_spec,
                              param_logical_axes)

from tests.support.fake_devices import run_with_fake_devices

# The path-fragment table (and its lookup) that the declared axes replaced, frozen here as the reference:
# (path fragment, logical axes of the kernel / embedding, of the bias). First match wins.
_FROZEN_PARAM_RULES = (
    ("embed_tokens", ("vocab", "embed"), ()),
    ("lm_head", ("embed", "vocab"), ("vocab",)),
    ("q_proj", ("embed", "heads"), ("heads",)),
    ("k_proj", ("embed", "kv_heads"), ("kv_heads",)),
    ("v_proj", ("embed", "kv_heads"), ("kv_heads",)),
    ("o_proj", ("heads", "embed"), ("embed",)),
    ("g_proj_1", ("embed", "mlp"), ("mlp",)),
    ("g_proj_2", ("mlp", None), (None,)),
    ("gate_proj", ("embed", "mlp"), ("mlp",)),
    ("up_proj", ("embed", "mlp"), ("mlp",)),
    ("down_proj", ("mlp", "embed"), ("embed",)),
    ("attn.qkv", ("embed", "heads"), ("heads",)),
    ("attn.proj", ("heads", "embed"), ("embed",)),
    ("mlp_0", ("embed", "mlp"), ("mlp",)),
    ("mlp_2", ("mlp", "embed"), ("embed",)),
    ("patch_embed", (None, "embed"), ("embed",)),
)


def _frozen_axes(path: str, ndim: int) -> tuple:
    for fragment, kernel_axes, bias_axes in _FROZEN_PARAM_RULES:
        if fragment in path:
            axes = bias_axes if path.endswith(".bias") else kernel_axes
            if len(axes) == ndim:
                return axes
    return (None,) * ndim  # norms and anything unmatched: replicated


class _Mesh:  # logical_to_spec reads only the axis sizes
    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **shape}


MESHES = [_Mesh(data=2, fsdp=4, tensor=2, sequence=2), _Mesh(fsdp=2, tensor=4), _Mesh(fsdp=8, sequence=4),
          _Mesh(tensor=8), _Mesh(fsdp=3, tensor=3)]
# Dense layers only, and a hybrid with NSA layers (their gates g_proj_1 / g_proj_2).
NSA = [NSAConfig(), NSAConfig(mode="videonsa", layers=(0,))]


def _abstract(preset: str, nsa: NSAConfig) -> Qwen25VL:
    return nnx.eval_shape(lambda: Qwen25VL(model_preset(preset, nsa), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("preset", ["tiny", "demo", "qwen25vl_7b"])
def test_declared_axes_give_the_frozen_partition_specs(preset):
    for nsa in NSA:
        model = _abstract(preset, nsa)
        axes = param_logical_axes(model)
        params = [(".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        assert sorted(axes) == sorted(n for n, _ in params)
        for name, var in params:
            assert declared_axes(var) is not None, f"{preset}: {name} declares no logical axes"
            shape = tuple(var.shape)
            assert axes[name] == _frozen_axes(name, len(shape)), name
            for mesh in MESHES:
                assert (logical_to_spec(axes[name], shape, mesh)
                        == logical_to_spec(_frozen_axes(name, len(shape)), shape, mesh)), (name, mesh.shape)
    if preset == "tiny":  # a representative set, by hand
        axes = param_logical_axes(_abstract("tiny", NSA[1]))
        layer = "language_model.layers"
        assert axes["language_model.embed_tokens.embedding"] == ("vocab", "embed")
        assert axes["lm_head.kernel"] == ("embed", "vocab")
        assert axes[f"{layer}.1.self_attn.q_proj.kernel"] == ("embed", "heads")
        assert axes[f"{layer}.1.self_attn.q_proj.bias"] == ("heads",)
        assert axes[f"{layer}.1.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
        assert axes[f"{layer}.1.self_attn.o_proj.kernel"] == ("heads", "embed")
        assert axes[f"{layer}.0.self_attn.g_proj_1.kernel"] == ("embed", "mlp")
        assert axes[f"{layer}.0.self_attn.g_proj_2.kernel"] == ("mlp", None)
        assert axes[f"{layer}.0.self_attn.g_proj_2.bias"] == (None,)
        assert axes[f"{layer}.1.mlp.down_proj.kernel"] == ("mlp", "embed")
        assert axes[f"{layer}.1.input_layernorm.weight"] == (None,)
        assert axes["language_model.norm.weight"] == (None,)
        assert axes["visual.patch_embed.proj.kernel"] == (None, "embed")
        assert axes["visual.blocks.0.attn.qkv.bias"] == ("heads",)
        assert axes["visual.blocks.0.mlp.gate_proj.bias"] == ("mlp",)
        assert axes["visual.merger.mlp_0.kernel"] == ("embed", "mlp")
        assert axes["visual.merger.mlp_2.bias"] == ("embed",)
        mesh = MESHES[0]
        assert logical_to_spec(axes[f"{layer}.1.self_attn.q_proj.kernel"], (64, 64), mesh) == \
            P(("fsdp", "sequence"), "tensor")


def test_loaded_models_keep_the_declared_axes(tmp_path):
    from nsa_jax.conversion import load_hf, load_orbax, save_hf, save_orbax
    model = Qwen25VL(model_preset("tiny", NSA[1]), rngs=nnx.Rngs(0))
    expected = param_logical_axes(model)
    save_orbax(model, str(tmp_path / "orbax"))
    save_hf(model, str(tmp_path / "hf"))
    assert param_logical_axes(load_orbax(str(tmp_path / "orbax"))) == expected
    assert param_logical_axes(load_hf(str(tmp_path / "hf"), nsa=NSA[1])) == expected


def test_logical_rules_merge_and_refuse():
    assert logical_rules() == LOGICAL_RULES and logical_rules({}) == LOGICAL_RULES
    rules = logical_rules({"mlp": (), "embed": ["fsdp"], "vocab": "tensor"})
    assert rules["mlp"] == () and rules["embed"] == ("fsdp",) and rules["vocab"] == ("tensor",)
    assert rules["heads"] == LOGICAL_RULES["heads"] and LOGICAL_RULES["mlp"] == ("tensor",)
    with pytest.raises(ValueError, match="only the parameter axes"):
        logical_rules({"batch": ("data",)})
    with pytest.raises(ValueError, match="mesh axes"):
        logical_rules({"mlp": ("model",)})
    with pytest.raises(ValueError, match="mesh axes"):
        logical_rules({"mlp": ("tensor", "tensor")})
    from configs.tiny import get_config
    from nsa_jax.training.validation import ConfigError, validate_config
    c = get_config()
    assert len(c.sharding_rules) == 0
    c.sharding_rules.batch = ("data",)
    with pytest.raises(ConfigError, match="config.sharding_rules"):
        validate_config(c)


def _override_changes_placement() -> dict:
    """On 4 fake CPU devices, mesh fsdp=2 x tensor=2: tiny's parameters placed with the config's rules."""
    import jax
    import jax.numpy as jnp

    from configs.tiny import get_config
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import make_optimizer
    from nsa_jax.training.train_step import TrainState, param_shardings, state_shardings

    cfg = model_preset("tiny")
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    out = {}
    for name, rules in (("default", {}), ("override", {"mlp": ()})):
        c = get_config()
        c.sharding_rules.update(rules)
        _, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="none", seed=0,
                                       sharding_rules=c.sharding_rules)
        tx = make_optimizer(params, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0)
        state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                                    jnp.zeros((), jnp.int32)), params)
        shardings = state_shardings(state, mesh, param_shardings(params))
        mlp = params["language_model"]["layers"][0]["mlp"]
        moments = [s.spec for s in jax.tree.leaves(shardings.opt_state) if len(s.spec) == 2]
        out[name] = {"gate": str(mlp["gate_proj"]["kernel"].sharding.spec),
                     "down": str(mlp["down_proj"]["kernel"].sharding.spec),
                     "q": str(params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding.spec),
                     "moment_specs": sorted({str(s) for s in moments})}
    return out


def test_config_override_changes_parameter_sharding(tmp_path):
    out = run_with_fake_devices(__file__, 4, tmp_path / "out.json")
    default, override = out["default"], out["override"]
    assert default["gate"] == str(P("fsdp", "tensor")) and default["down"] == str(P("tensor", "fsdp"))
    assert override["gate"] == str(P("fsdp", None)) and override["down"] == str(P(None, "fsdp"))
    assert default["q"] == override["q"] == str(P("fsdp", "tensor"))  # heads keep their rule
    # The Adam moments follow their parameters.
    assert str(P("fsdp", "tensor")) in default["moment_specs"] and str(P("fsdp", None)) in override["moment_specs"]


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(_override_changes_placement(), f)
