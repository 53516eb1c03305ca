"""The non-finite guard skips a poisoned step (parameters and optimizer state unchanged) and aborts after
`train.max_bad_steps` consecutive ones; gradient accumulation equals one larger batch."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.tiny import get_config
from nsa_jax.training.checkpoint import Checkpointer
from nsa_jax.training.loop import NonFiniteError, train


def test_nan_guard_skips_then_aborts(tmp_path):
    c = get_config()
    # Data steps 1, 3, 4 are poisoned: train step 2 is skipped, 3 applies, 4 and 5 fail -> abort at step 5.
    c.data.poison_steps = (1, 3, 4)
    c.train.update(steps=8, max_bad_steps=2)
    c.checkpoint.update(every=1, keep=10, async_save=False)
    with pytest.raises(NonFiniteError, match="step 5: 2 consecutive"):
        train(c, str(tmp_path))
    ckpt = Checkpointer(os.path.join(tmp_path, "checkpoints"))
    assert ckpt.steps() == [1, 2, 3, 4]
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    states = {s: ckpt.manager.restore(s, args=args)["state"] for s in (1, 2, 3, 4)}
    ckpt.close()
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(states[1]["params"], states[2]["params"]) and same(states[1]["opt_state"], states[2]["opt_state"])
    assert not same(states[2]["params"], states[3]["params"])
    assert same(states[3]["params"], states[4]["params"])
    assert [int(states[s]["bad_steps"]) for s in (1, 2, 3, 4)] == [0, 1, 0, 1]


def test_gradient_accumulation_equals_one_batch():
    import jax.numpy as jnp

    from nsa_jax.training.device_batch import device_batch
    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import make_optimizer
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.synthetic_data import SyntheticBatches
    from nsa_jax.training.train_step import StepFunctions, TrainState, param_shardings, state_shardings

    c = get_config()
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    graphdef, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="none", seed=0)
    tx = make_optimizer(params, learning_rate=1e-2, weight_decay=0.01, grad_clip=1.0)
    initial = jax.device_get(params)
    new_state = lambda: TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, initial), tx.init(initial),
                                   jnp.zeros((), jnp.int32))  # fresh arrays: the step donates its state
    shardings = state_shardings(jax.eval_shape(new_state), mesh, param_shardings(params))
    fns = StepFunctions(graphdef, tx, mesh, loss_chunk=32).compile(shardings)
    whole = SyntheticBatches(cfg, batch_size=4, seq_len=64, video_grid=(2, 4, 4), max_patches=128).batch(0)
    halves = [{k: (v[:, 2 * i:2 * i + 2] if k == "position_ids" else v[64 * i:64 * i + 64] if k.startswith("pixel")
                   else v[2 * i:2 * i + 2]) for k, v in whole.items()} for i in range(2)]
    one, m1 = fns.apply(new_state(), fns.micro(initial, device_batch(whole, cfg, mesh)))
    two, m2 = fns(new_state(), [device_batch(h, cfg, mesh) for h in halves])
    assert float(m1.loss) == pytest.approx(float(m2.loss), rel=1e-5)
    assert float(m1.grad_norm) == pytest.approx(float(m2.grad_norm), rel=1e-4)
    sums = fns.micro(one.params, device_batch(whole, cfg, mesh))
    acc = fns.add(*(fns.micro(one.params, device_batch(h, cfg, mesh)) for h in halves))
    for a, b in zip(jax.tree.leaves(sums.grads), jax.tree.leaves(acc.grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.max(np.abs(a))))
    # Adam's first step is ~lr * sign(g): near-zero gradients may flip sign by rounding, hence atol = lr / 100.
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert not np.allclose(np.asarray(jax.tree.leaves(one.params)[0]), np.asarray(jax.tree.leaves(initial)[0]))
