"""Pieces of the trainer against hand computations: targets, schedule, freezing, sharding specs, the event
file format, padded vision layouts and FLOP counts."""

from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nsa_jax.config import tiny_config
from nsa_jax.training import events, flops
from nsa_jax.training.loss import cross_entropy_sum, shifted_targets
from nsa_jax.training.optimizer import learning_rate_schedule, trainable_labels
from nsa_jax.training.train_step import initial_state, place_initial_state
from nsa_jax.sharding import logical_to_spec, make_mesh, param_logical_axes
from nsa_jax.model import Qwen25VL, VisionInput
from nsa_jax.training.vision_batch import frame_chunks, host_chunks, padded_vision_layout, token_order
from nsa_jax.vision import VisionTower, vision_layout


def test_shifted_targets_respect_labels_and_segments():
    labels = jnp.array([[-100, 5, 6, -100, 7, 8, 0, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    targets, weights = shifted_targets(labels, seg)
    # Position t predicts labels[t+1]: 5, 6 (seg 1), then nothing across the 1->2 boundary, 7 and 8 in seg 2.
    assert weights.tolist() == [[True, True, False, True, True, False, False, False]]
    assert targets[0, :5].tolist() == [5, 6, 0, 7, 8]


def test_cross_entropy_chunks_equal_direct():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 8)))
    weights = jnp.asarray(rng.random((2, 8)) > 0.3)
    logits = hidden @ w
    direct = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0] * weights)
    # Chunks made of a piece of every shard of the token axis give the same sum (that each device then computes
    # only its own tokens' logits is checked in tests/training/test_train_mesh.py).
    for shards in (1, 2, 4):
        total, count = cross_entropy_sum(hidden, lambda h: h @ w, targets, weights, chunk=4, shards=shards)
        assert float(total) == pytest.approx(float(direct), rel=1e-5)
        assert float(count) == float(weights.sum())


def test_cross_entropy_skips_chunks_without_weighted_tokens():
    """Hidden rows of NaN in a chunk whose tokens carry no weight never reach the loss or its gradients: the chunk
    is not computed. The other chunks give the direct loss and gradients."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 12, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 12)))
    weights = jnp.asarray(rng.random((2, 12)) > 0.3).at[:, 4:8].set(False)
    direct = lambda h, w_: -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w_), targets[..., None], -1)[..., 0]
                                    * weights)
    chunked = lambda h, w_: cross_entropy_sum(h, lambda x: x @ w_, targets, weights, chunk=4)[0]
    poisoned = hidden.at[:, 4:8].set(jnp.nan)
    got, (g_h, g_w) = jax.value_and_grad(chunked, argnums=(0, 1))(poisoned, w)
    want, (r_h, r_w) = jax.value_and_grad(direct, argnums=(0, 1))(hidden, w)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g_w), np.asarray(r_w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_h), np.asarray(r_h), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(r_h[:, 4:8]).max()) == 0.0  # the skipped chunk's rows had no gradient to lose


def test_schedule_warmup_then_cosine():
    s = learning_rate_schedule(1e-3, 100, 0.1, 0.0)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4) and float(s(10)) == pytest.approx(1e-3)
    assert float(s(55)) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), rel=1e-5)


def test_freeze_labels():
    params = {"visual": {"blocks": {"0": {"w": 0}}, "merger": {"w": 0}, "patch_embed": {"w": 0}},
              "language_model": {"w": 0}, "lm_head": {"w": 0}}
    labels = trainable_labels(params, ["vision_tower"])
    assert labels["visual"]["blocks"]["0"]["w"] == "frozen" and labels["visual"]["patch_embed"]["w"] == "frozen"
    assert labels["visual"]["merger"]["w"] == "train" and labels["lm_head"]["w"] == "train"
    with pytest.raises(ValueError, match="freeze"):
        trainable_labels(params, ["vision"])


def test_sharding_rules():
    mesh = make_mesh({"fsdp": -1}, jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    axes = param_logical_axes(nnx.eval_shape(lambda: Qwen25VL(tiny_config(), rngs=nnx.Rngs(0))))
    assert axes["language_model.layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert axes["language_model.layers.0.self_attn.q_proj.bias"] == ("heads",)
    assert axes["language_model.norm.weight"] == (None,)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh({"data": 4}, jax.devices()[:1])

    class FakeMesh:  # logical_to_spec only reads the axis sizes
        shape = {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 1}

    assert logical_to_spec(("embed", "heads"), (64, 6), FakeMesh()) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "heads"), (6, 3), FakeMesh()) == P(None, None)  # 4 / 2 do not divide
    assert logical_to_spec(("batch", "sequence"), (8, 16), FakeMesh()) == P(("data", "fsdp"), None)

    class ContextMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4}

    # Parameter rows are sharded over the context-parallel devices too (ZeRO-3 over fsdp x sequence).
    assert logical_to_spec(("embed", "mlp"), (64, 6), ContextMesh()) == P(("fsdp", "sequence"), None)
    assert logical_to_spec(("batch", "sequence", None), (2, 16, 8), ContextMesh()) == P("fsdp", "sequence", None)


def test_videonsa_3b_config_parameter_count_by_hand():
    from configs.videonsa_3b import get_config
    from nsa_jax.model import Qwen25VL
    from nsa_jax.config import NSAConfig, model_preset
    c = get_config()
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    h, kv, mlp, heads = 2048, 256, 11008, 16  # Qwen2.5-3B: width, KV width (2 x 128), MLP, query heads
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h  # attention, MLP, two norms
    layer += (h * h + h) + (h * 3 * heads + 3 * heads)  # NSA gates g_proj_1, g_proj_2
    vision = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model.visual, nnx.Param)))
    assert counted == 151936 * h + 36 * layer + h + vision  # tied embedding, final norm
    assert counted > 3.8e9 and c.data.seq_len == 65536


def test_synthetic_text_vocab():
    from nsa_jax.training.synthetic_data import SyntheticBatches
    cfg = tiny_config()
    batch = SyntheticBatches(cfg, batch_size=2, seq_len=64, video_grid=(2, 4, 4), max_patches=64,
                             text_vocab=5).batch(0)
    text = batch["input_ids"][batch["input_ids"] < cfg.vision_start_token_id]
    assert set(np.unique(text).tolist()) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="text_vocab=1"):
        SyntheticBatches(cfg, batch_size=2, seq_len=64, video_grid=(2, 4, 4), max_patches=64, text_vocab=1)


def _read_records(path):
    data = open(path, "rb").read()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == events._masked_crc(data[i:i + 8])
        rec = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == events._masked_crc(rec)
        out.append(rec)
        i += 16 + n
    return out


def test_event_file(tmp_path):
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = events.EventWriter(str(tmp_path))
    w.scalars(7, {"loss": 1.5})
    w.close()
    recs = _read_records(w.path)
    assert len(recs) == 2 and b"brain.Event:2" in recs[0]
    assert b"loss" in recs[1] and struct.pack("<f", 1.5) in recs[1] and b"\x10\x07" in recs[1]  # step 7


def test_padded_layout_gives_the_same_vision_features():
    cfg = tiny_config().vision
    tower = VisionTower(cfg, rngs=nnx.Rngs(0))
    grid = np.array([[2, 4, 4], [2, 4, 8]])
    rows = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).standard_normal((rows, cfg.patch_dim)).astype(np.float32)
    exact = tower(jnp.asarray(pixels), vision_layout(grid, cfg))
    table = np.concatenate([grid, np.zeros((3, 3), np.int64)])  # padded grid table
    padded_pixels = np.concatenate([pixels, np.zeros((40, cfg.patch_dim), np.float32)])
    layout = padded_vision_layout(table, rows + 40, cfg, bucket_segments=16, bucket_width=64, max_frame_rows=16)
    assert layout.window_segments.gather.shape[0] % 16 == 0 and layout.frame_segments.gather.shape[1] == 64

    def real_sum(p):
        return jnp.sum(tower(p, layout)[:rows // 4] ** 2)

    padded = tower(jnp.asarray(padded_pixels), layout)
    np.testing.assert_allclose(np.asarray(padded[:rows // 4]), np.asarray(exact), rtol=1e-5, atol=1e-5)
    grads = jax.grad(real_sum)(jnp.asarray(padded_pixels))
    assert np.all(np.isfinite(grads)) and not np.any(grads[rows:])
    with pytest.raises(ValueError, match="multiple of"):
        padded_vision_layout(table, rows + 2, cfg)


def test_checkpoints_only_on_the_interval(tmp_path):
    from nsa_jax.training.checkpoint import Checkpointer
    from nsa_jax.training.train_step import TrainState
    ckpt = Checkpointer(str(tmp_path), save_every=3, async_save=False)
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)}, {"m": jnp.zeros(2)}, jnp.zeros((), jnp.int32))
    saved = [ckpt.save(s, state, {"step": s}) for s in (1, 2, 3, 4)] + [ckpt.save(5, state, {}, force=True)]
    ckpt.close()
    assert saved == [False, False, True, False, True] and ckpt.steps() == [3, 5]  # no save of the first step


def test_frame_chunks_by_hand():
    cfg = tiny_config().vision
    # Frames of 16, 16, 32, 16 rows (two videos and an image) over 2 chunks of 48 rows.
    plan = frame_chunks(np.array([[2, 4, 4], [1, 4, 8], [0, 0, 0], [1, 4, 4]]), 2, cfg, min_rows=48)
    assert plan.rows == 48 and plan.starts == [0, 32] and plan.real_rows == [32, 32 + 16]
    assert [g.tolist() for g in plan.grids] == [[[2, 4, 4]], [[1, 4, 8], [1, 4, 4]]]
    # 3 chunks of 20 rows cannot hold a 32-row frame: grown by `growth` until all fit whole.
    plan = frame_chunks(np.array([[2, 4, 4], [1, 4, 8], [1, 4, 4]]), 3, cfg, min_rows=20, growth=4)
    assert plan.rows == 32 and plan.real_rows == [32, 32, 16]


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5])
def test_chunked_tower_equals_whole_tower(num_chunks):
    cfg = tiny_config()
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    grid = np.array([[2, 4, 4], [1, 4, 8], [3, 4, 4], [0, 0, 0]])  # videos and an image, padded grid table
    rows = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).standard_normal((rows + 24, cfg.vision.patch_dim)).astype(np.float32)
    pixels[rows:] = 0.0
    exact = model.visual(jnp.asarray(pixels[:rows]), vision_layout(grid[:3], cfg.vision))
    chunked, layout, real = host_chunks(pixels, grid, num_chunks, cfg.vision)
    assert chunked.shape[0] == num_chunks and real.sum() == rows // 4
    order = token_order(real, chunked.shape[1] // 4)
    assert sorted(order.tolist()) == list(range(num_chunks * chunked.shape[1] // 4))
    features = model.vision_features(VisionInput(jnp.asarray(chunked), layout, jnp.asarray(order)))
    np.testing.assert_allclose(np.asarray(features[:rows // 4]), np.asarray(exact), rtol=1e-5, atol=1e-5)


def test_flops_of_a_dense_model_by_hand():
    cfg = tiny_config()
    t = cfg.text
    n = 10
    per_layer = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) \
        + 3 * t.hidden_size * t.intermediate_size
    matmul = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size
    attention = t.num_hidden_layers * 4 * t.num_attention_heads * t.head_dim * n * (n + 1) / 2
    want = 3 * 2 * (2 * matmul * n + attention)
    assert flops.train_step_flops(cfg, samples=2, text_tokens=n, vision_tokens=0) == want
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and flops.peak_flops("cpu") is None


def test_initial_state_takes_over_the_parameters():
    """place_initial_state consumes the parameters (their buffers become the state's: no second copy) and
    starts at step 0 with zero Adam moments."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    tx = optax.adam(1e-3)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             jax.eval_shape(lambda p: initial_state(tx, p), params))
    state = place_initial_state(tx, params, shardings)
    assert params["w"].is_deleted()
    np.testing.assert_array_equal(state.params["w"], np.arange(6.0).reshape(2, 3))
    assert int(state.step) == 0 and float(jnp.abs(state.opt_state[0].mu["w"]).sum()) == 0.0
