"""Orbax checkpoints of the training state and the data iterator, with resume.

Each step directory holds two items: `state` (parameters, optimizer state, step and the non-finite
counter; sharded, written asynchronously) and `data` (the data iterator's state as JSON), so a resumed run
sees exactly the batches the interrupted one would have. An interrupted save leaves only a temporary
directory that Orbax ignores. A step that cannot be read raises `CheckpointError` naming its directory and
the earlier steps; resume from one of those with `resume_from_step` (never silently: skipping a checkpoint
repeats training steps). Resuming from an explicit step moves the later checkpoints to
`<workdir>/abandoned_checkpoints/` so the new run can write those steps again.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nsa_jax.training.train_step import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored."""


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        # Only the interval (and `force`): Orbax's default policy also saves the first step of a fresh run,
        # which wrote the 3B config's 47 GB state while step 2 ran.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               should_save_fn=lambda step, last: step % save_every == 0,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def set_aside_after(self, step: int, destination: str) -> list[int]:
        """Moves the checkpoints of steps after `step` into `destination` (a resume from `step` abandons them).

        Process 0 moves the directories; every process then reloads the step list."""
        later = [s for s in self.steps() if s > step]
        if jax.process_index() == 0:
            os.makedirs(destination, exist_ok=True)
            for s in later:
                os.replace(self.step_dir(s), os.path.join(destination, f"{s}.{int(time.time())}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint_set_aside")
        self.manager.reload()
        return later

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None, *, force: bool = False
             ) -> bool:
        """Saves (asynchronously) when `step` is on the save interval or `force`; True if it did."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state (placed as `abstract_state`'s shardings say) and the data iterator state of `step`."""
        if step not in self.steps():
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {self.steps()}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state._asdict()),
                                  data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            earlier = [s for s in self.steps() if s < step]
            hint = (f"earlier checkpoints: steps {earlier}; resume from one with --config.resume_from_step=N"
                    if earlier else "no earlier checkpoint")
            raise CheckpointError(f"checkpoint {self.step_dir(step)} (step {step}) is unreadable or corrupt "
                                  f"({type(e).__name__}: {str(e)[:300]}); {hint}") from e
        return TrainState(**restored["state"]), dict(restored["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings, the restore target of a state."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
