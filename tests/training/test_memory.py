"""nsa_jax.training.memory: the per-device memory terms follow the shapes (state split over the devices, activations
linear in the tokens, the gathered keys in the whole sequence)."""

from nsa_jax.training.memory import GIB, table


def test_memory_terms_follow_the_shapes():
    out = table("tiny", "videonsa", 8, [1024, 4096], loss_chunk=256)
    small, large = out["GiB"][1024], out["GiB"][4096]
    state = "model state: f32 params, grads, Adam m and v (ZeRO-3)"
    assert abs(small["held"][state] * GIB - out["parameters"]["total"] * 16 / 8) < 1
    checkpoints = "remat checkpoints: decoder layer inputs"
    assert abs(large["held"][checkpoints] - 4 * small["held"][checkpoints]) < 1e-12
    kv = "k, v of the whole sequence, their grads, zeroed copies"  # tiny: 2 KV heads of dim 16, bf16, 3 copies
    assert abs(large["decoder layer backward"][kv] * GIB - 4096 * 2 * 2 * 16 * 2 * 3) < 1e-6
    assert out["peak_GiB"][4096]["total"] > out["peak_GiB"][1024]["total"]
