"""Orbax checkpoints of the training state and the data iterator, with resume.

Each step directory holds three items: `state` (parameters, optimizer state, step and the non-finite
counter; sharded, written asynchronously), `data` (the data iterator's state as JSON), so a resumed run
sees exactly the batches the interrupted one would have, and `config` (the training config as JSON). An
interrupted save leaves only a temporary directory that Orbax ignores. A step whose arrays do not match the
state to restore (a checkpoint of another config in the same workdir) raises `CheckpointError` naming the
config fields and arrays that differ; a step that cannot be read raises it naming its directory and the
earlier steps; resume from one of those with `--config.checkpoint.resume_from_step=N` (never silently:
skipping a checkpoint repeats training steps). Resuming from an explicit step moves the later checkpoints to
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
from nsa_jax.conversion import CheckpointError
from nsa_jax.sharding import dotted_path


class Checkpointer:
    """Saves and restores training states; `config` (a JSON-able dict) is saved with each step and compared
    when a step does not match the state to restore."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True,
                 config: dict[str, Any] | None = None):
        self.directory = os.path.abspath(directory)
        self.config = config or {}
        # Only the interval (and `force`): Orbax's default policy also saves the first step of a fresh run,
        # which wrote the 3B config's 47 GB state while step 2 ran.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               should_save_fn=lambda step, last: step % save_every == 0,
                                               enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}  # named, so a fresh manager reads the metadata
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
                                  data=ocp.args.JsonSave(data_state or {}), config=ocp.args.JsonSave(self.config))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state (placed as `abstract_state`'s shardings say) and the data iterator state of `step`."""
        if step not in self.steps():
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {self.steps()}")
        self._check_same_arrays(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state._asdict()),
                                  data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            earlier = [s for s in self.steps() if s < step]
            hint = (f"earlier checkpoints: steps {earlier}; resume from one with "
                    "--config.checkpoint.resume_from_step=N" if earlier else "no earlier checkpoint")
            raise CheckpointError(f"checkpoint {self.step_dir(step)} (step {step}) is unreadable or corrupt "
                                  f"({type(e).__name__}: {str(e)[:300]}); {hint}") from e
        return TrainState(**restored["state"]), dict(restored["data"] or {})

    def _check_same_arrays(self, step: int, abstract_state: TrainState) -> None:
        """Raises CheckpointError when the step's saved arrays differ from `abstract_state`'s (Orbax would
        restore other shapes silently), naming the config fields and arrays that differ. A step whose
        metadata cannot be read passes: its restore reports it as corrupt."""
        try:
            saved = _shapes(self.manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore names the corruption
            return
        wanted = _shapes(abstract_state._asdict())
        keys = sorted(saved.keys() | wanted.keys(), key=lambda k: (not k.startswith("params."), k))
        arrays = [f"{k}: {saved.get(k, 'absent')} there, {wanted.get(k, 'absent')} here"
                  for k in keys if saved.get(k) != wanted.get(k)]
        if not saved or not arrays:
            return
        fields = _config_differences(self._saved_config(step), self.config)
        raise CheckpointError(
            f"checkpoint {self.step_dir(step)} (step {step}) is healthy but was made by another config: "
            f"these fields differ: {'; '.join(fields) or 'unknown (no config saved with it)'}; "
            f"{len(arrays)} arrays differ, e.g. {'; '.join(arrays[:3])}; use another --workdir, or the config "
            "that made it")

    def _saved_config(self, step: int) -> dict[str, Any]:
        """The config saved with `step` ({} for checkpoints written before configs were saved)."""
        if not os.path.isdir(os.path.join(self.step_dir(step), "config")):
            return {}
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of a tree's arrays (saved metadata or abstract state alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {dotted_path(path): tuple(leaf.shape) for path, leaf in leaves}


def _config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """"field=SAVED there, CURRENT here" for each leaf field that differs (none when `saved` is empty)."""
    if not saved:
        return []
    out = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} there, {b!r} here")
    return out


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings, the restore target of a state."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
