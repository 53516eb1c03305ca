"""Checkpoints: Hugging Face safetensors <-> Flax NNX model <-> Orbax, streamed tensor by tensor.

HF key layouts read: "flat" (`model.layers.*`, `model.embed_tokens.*`, `visual.*`, `lm_head.*`) and "nested"
(`model.language_model.*`, `model.visual.*`, `lm_head.*`). VideoNSA checkpoints add per-layer
`self_attn.g_proj_1.*` / `self_attn.g_proj_2.*`. An Orbax directory holds `config.json` and `params/`; a
training workdir holds `config.json`, optionally `tokenizer.json`, and `checkpoints/<step>/state` (the train
state, whose `params` are loaded).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from nsa_jax.config import ModelConfig
from nsa_jax.model import Qwen25VL, abstract_model
from nsa_jax.sharding import dotted_path

PARAMS_DIR = "params"
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's: <workdir>/checkpoints/<step>/state
STATE_ITEM = "state"
TOKENIZER = "tokenizer.json"
SHARD_BYTES = 4 << 30
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped keys, unreadable files."""


# ---------------------------------------------------------------------------- key mapping


def _hf_name(path: tuple) -> str:
    """Canonical HF name (without layout prefix) of an NNX parameter path."""
    parts = [str(p) for p in path]
    leaf = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    body = [{"mlp_0": "mlp.0", "mlp_2": "mlp.2"}.get(p, p) for p in parts[:-1]]
    return ".".join(body + [leaf])


def _to_layout(name: str, layout: str) -> str:
    if name.startswith("lm_head."):
        return name
    if name.startswith("visual."):
        return name if layout == "flat" else "model." + name
    assert name.startswith("language_model.")
    rest = name[len("language_model."):]
    return "model." + rest if layout == "flat" else "model.language_model." + rest


def _from_any_layout(key: str) -> str:
    """Canonical name of an HF key in either layout."""
    for prefix, canon in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                          ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(prefix):
            return canon + key[len(prefix):]
    return key


def detect_layout(keys) -> str:
    return "nested" if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys) else "flat"


def _param_table(model: Qwen25VL) -> dict[str, tuple[tuple, tuple, Any]]:
    """{canonical HF name: (nnx path, nnx shape, dtype)} for every parameter of the (abstract) model."""
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        table[_hf_name(path)] = (path, tuple(var.shape), var.dtype)
    return table


def _to_nnx(name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
    """HF tensor -> NNX layout (torch Linear [out, in] -> kernel [in, out]; Conv3d -> flattened kernel)."""
    if name.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in name:
        array = array.reshape(array.shape[0], -1).T
    return array


def _to_hf(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    if name == "visual.patch_embed.proj.weight":
        v = config.vision
        return array.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if name.endswith(".weight") and array.ndim == 2 and "embed_tokens" not in name:
        return array.T
    return array


# ---------------------------------------------------------------------------- safetensors reading


def _safetensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index}: shard files {missing} not found")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def _open(file: str):
    try:
        return safe_open(file, framework="np")
    except Exception as e:  # safetensors' SafetensorError on a damaged header
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def iter_hf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, numpy array) from an HF directory, one tensor in memory at a time."""
    for file in _safetensor_files(path):
        with _open(file) as f:
            for key in f.keys():
                try:
                    array = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} unreadable ({e})") from e
                yield key, array


def hf_dtypes(path: str) -> dict[str, tuple[str, int]]:
    """{key: (dtype name, element count)} of an HF directory's tensors, from the safetensors headers."""
    out = {}
    for file in _safetensor_files(path):
        with _open(file) as f:
            for key in f.keys():
                info = f.get_slice(key)
                out[key] = (_SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype().lower()),
                            math.prod(info.get_shape()))
    return out


def checkpoint_dtype(dtypes: dict[str, tuple[str, int]], source: str, loaded_as=None) -> str:
    """The dtype of most of a checkpoint's elements (from `dtypes`, as `hf_dtypes` gives them); warns naming
    each key stored in another dtype (a float16 tensor in a float32 checkpoint) and what it is loaded as."""
    elements: collections.Counter[str] = collections.Counter()
    for name, count in dtypes.values():
        elements[name] += count
    main = elements.most_common(1)[0][0] if elements else "float32"
    odd = [f"{key} ({name})" for key, (name, _) in dtypes.items() if name != main]
    if odd:
        warnings.warn(f"{source}: {len(odd)} tensors are not {main} like the rest of the checkpoint: "
                      f"{', '.join(odd[:10])}{' ...' if len(odd) > 10 else ''}; loaded as "
                      f"{jnp.dtype(loaded_as or main).name} (the dtype argument picks another)", stacklevel=3)
    return main


# ---------------------------------------------------------------------------- load


def _fill(model: Qwen25VL, tensors: Iterator[tuple[str, np.ndarray]], source: str,
          cast: Callable[[np.ndarray, Any], jax.Array]) -> Qwen25VL:
    """Puts named HF tensors into an abstract model; raises on missing / unexpected / mis-shaped keys."""
    table = _param_table(model)
    tied = model.config.text.tie_word_embeddings
    flat: dict[tuple, jax.Array] = {}
    unexpected = []
    for key, array in tensors:
        name = _from_any_layout(key)
        if name == "lm_head.weight" and tied:
            continue  # tied: the embedding is the head
        if name not in table:
            unexpected.append(key)
            continue
        path, shape, dtype = table[name]
        array = _to_nnx(name, array, shape)
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(array.shape)}, the model expects "
                                  f"{shape} (in the model's layout)")
        flat[path] = cast(array, dtype)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = [n for n, (p, _, _) in table.items() if p not in flat]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    # replace: each Param keeps its metadata (the logical axes it declares, nsa_jax.sharding).
    state = nnx.from_flat_state([(p, var.replace(flat[p])) for p, var in nnx.to_flat_state(state)])
    return nnx.merge(graphdef, state, rest)


def _caster(param_dtype) -> Callable[[np.ndarray, Any], jax.Array]:
    """Casts a loaded tensor to param_dtype (no copy when it has that dtype already)."""
    return lambda array, _: jnp.asarray(np.asarray(array).astype(param_dtype, copy=False))


def load_hf(path: str, *, dtype=None, compute_dtype=None, nsa=None) -> Qwen25VL:
    """A model from an HF Qwen2.5-VL or VideoNSA directory (config.json + safetensors).

    dtype: parameter dtype (None keeps the checkpoint's dtype; a tensor stored in another is cast to it, with a
    warning naming it); compute_dtype: activations' dtype (default: dtype, else float32). nsa: an `NSAConfig`
    overriding the checkpoint's NSA settings.
    """
    dtypes = hf_dtypes(path)
    stored = checkpoint_dtype(dtypes, path, dtype)
    keys = list(dtypes)
    has_gates = any(".g_proj_1." in k for k in keys)
    config = ModelConfig.from_json(path, has_gates=has_gates).replace(hf_key_layout=detect_layout(keys))
    if nsa is not None:
        config = config.replace(nsa=nsa)
    model = abstract_model(config, dtype=compute_dtype or dtype or jnp.float32, param_dtype=dtype or jnp.float32)
    return _fill(model, iter_hf_tensors(path), path, _caster(dtype or stored))


def save_hf(model: Qwen25VL, path: str, *, dtype=None, layout: str | None = None,
            shard_bytes: int = SHARD_BYTES) -> None:
    """Writes safetensors (sharded with an index when large) + config.json that transformers loads.

    dtype: the tensors' dtype (default: the parameters'); layout: HF key layout (default: the config's).
    Converts and writes one shard at a time.
    """
    config = model.config
    layout = layout or config.hf_key_layout
    os.makedirs(path, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name + ".tmp"), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard.clear()

    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _hf_name(p)
        array = np.asarray(jax.device_get(var[...]))
        if dtype is not None:
            array = array.astype(dtype)
        shard[_to_layout(name, layout)] = np.ascontiguousarray(_to_hf(name, array, config))
        if sum(a.nbytes for a in shard.values()) >= shard_bytes:
            flush()
    flush()
    if len(files) == 1:
        os.replace(os.path.join(path, files[0] + ".tmp"), os.path.join(path, "model.safetensors"))
    else:
        total = len(files)
        renamed = {f: f.replace(".safetensors", f"-of-{total:05d}.safetensors") for f in files}
        for f, r in renamed.items():
            os.replace(os.path.join(path, f + ".tmp"), os.path.join(path, r))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, fh, indent=1)
    config.to_json(os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------- Orbax


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save_orbax(model: Qwen25VL, path: str) -> None:
    """Writes `config.json` and `params/` (an Orbax checkpoint of the parameters)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = _checkpointer()
    ckpt.save(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckpt.wait_until_finished()
    model.config.to_json(os.path.join(path, "config.json"))


def load_orbax(path: str, *, dtype=None, compute_dtype=None) -> Qwen25VL:
    """A model from an Orbax directory written by `save_orbax` (dtype None keeps the stored dtype; a tensor
    stored in another is cast to it, with a warning naming it)."""
    path = os.path.abspath(path)
    config = ModelConfig.from_json(path)
    model = abstract_model(config, dtype=compute_dtype or dtype or jnp.float32, param_dtype=dtype or jnp.float32)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    ckpt = _checkpointer()
    params = os.path.join(path, PARAMS_DIR)
    try:
        stored = {dotted_path(kp): m for kp, m in
                  jax.tree_util.tree_flatten_with_path(ckpt.metadata(params).item_metadata)[0]}
        expected = nnx.to_pure_dict(state)
        main = checkpoint_dtype({k: (jnp.dtype(m.dtype).name, math.prod(m.shape)) for k, m in stored.items()},
                                params, dtype)
        leaves = []
        for kp, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
            name = dotted_path(kp)
            if name not in stored:
                raise CheckpointError(f"{params}: missing key {name}")
            if tuple(stored[name].shape) != tuple(leaf.shape):
                raise CheckpointError(f"{params}: key {name} has shape {tuple(stored[name].shape)}, "
                                      f"the model expects {tuple(leaf.shape)}")
            leaves.append(jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype or main)))
        target_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), leaves)
        restored = ckpt.restore(params, target_tree)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types on a damaged directory
        raise CheckpointError(f"{params}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state, rest)


def load_training_params(state_dir: str, config: ModelConfig, *, dtype=None, compute_dtype=None) -> Qwen25VL:
    """The model whose parameters are the `params` entry of a training-state Orbax item (launch/train.py's
    `<workdir>/checkpoints/<step>/state`, float32 master parameters), read alone (not the optimizer state);
    dtype: parameter dtype (None: as stored). Raises CheckpointError on missing or mis-shaped keys."""
    import orbax.checkpoint as ocp
    ckpt = ocp.PyTreeCheckpointer()
    try:
        tree = ckpt.metadata(os.path.abspath(state_dir)).item_metadata.tree
    except Exception as e:  # orbax raises many types on a damaged directory
        raise CheckpointError(f"{state_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from e
    if "params" not in tree:
        raise CheckpointError(f"{state_dir}: no 'params' entry (keys {sorted(tree)})")
    stored = {dotted_path(kp): m for kp, m in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
    model = abstract_model(config, dtype=compute_dtype or dtype or jnp.float32, param_dtype=dtype or jnp.float32)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        name = ".".join(map(str, path))
        if name not in stored:
            raise CheckpointError(f"{state_dir}: missing key params.{name}")
        if tuple(stored[name].shape) != tuple(var.shape):
            raise CheckpointError(f"{state_dir}: key params.{name} has shape {tuple(stored[name].shape)}, the "
                                  f"model expects {tuple(var.shape)}")
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype or m.dtype),
                                tree["params"])
    try:
        raw = ckpt.restore(os.path.abspath(state_dir), args=ocp.args.PyTreeRestore(
            item={"params": tree["params"]}, restore_args={"params": restore_args}, partial_restore=True))
    except Exception as e:  # orbax raises many types on a damaged directory
        raise CheckpointError(f"{state_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from e
    values = {dotted_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(raw["params"])[0]}
    leaves = [(path, var.replace(jnp.asarray(values[".".join(map(str, path))]))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


# ---------------------------------------------------------------------------- training workdirs


def save_training_files(workdir: str, config: ModelConfig, tokenizer: str | None = None) -> None:
    """Writes what a load needs beside a training run's checkpoints: `config.json` (the model config) and,
    when the run has one, a copy of its `tokenizer.json`."""
    os.makedirs(workdir, exist_ok=True)
    _write_replacing(os.path.join(workdir, "config.json"), config.to_json)
    if tokenizer:
        _write_replacing(os.path.join(workdir, TOKENIZER), lambda tmp: shutil.copyfile(tokenizer, tmp))


def _write_replacing(path: str, write: Callable[[str], Any]) -> None:
    """`write(temporary path)`, then the temporary file replaces `path` (never half a file there)."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def training_tokenizer(path: str) -> str | None:
    """The `tokenizer.json` the trainer copied into the workdir of a training workdir or step directory."""
    step_dir = training_step_dir(path)
    file = None if step_dir is None else os.path.join(training_workdir(step_dir), TOKENIZER)
    return file if file and os.path.isfile(file) else None


def training_step_dir(path: str) -> str | None:
    """The checkpoint step directory that `path` names: itself (`<workdir>/checkpoints/<step>`) or a training
    workdir's latest finished step; None when `path` is neither. Raises CheckpointError for a workdir without
    a finished step."""
    if os.path.isdir(os.path.join(path, STATE_ITEM)):
        return path
    root = os.path.join(path, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return None
    steps = [int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, STATE_ITEM))]
    if not steps:
        raise CheckpointError(f"{path}: a training workdir without a finished checkpoint in {root}")
    return os.path.join(root, str(max(steps)))


def training_workdir(step_dir: str) -> str:
    """The training workdir of a checkpoint step directory (`<workdir>/checkpoints/<step>`)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))


def load_training(path: str, *, dtype=None, compute_dtype=None, nsa=None) -> Qwen25VL:
    """The model of a training workdir (its latest step) or of one checkpoint step directory, with the model
    config the trainer wrote beside the checkpoints; dtype None keeps the master parameters' float32."""
    step_dir = training_step_dir(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: neither a training workdir nor a checkpoint step directory")
    workdir = training_workdir(step_dir)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise CheckpointError(f"{workdir}: no config.json (the trainer writes the model config there; a run "
                              "older than that needs it written with ModelConfig.to_json for its preset)")
    config = ModelConfig.from_json(workdir)
    if nsa is not None:
        config = config.replace(nsa=nsa)
    return load_training_params(os.path.join(step_dir, STATE_ITEM), config, dtype=dtype, compute_dtype=compute_dtype)


def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


def from_pretrained(path: str, *, dtype=None, compute_dtype=None, nsa=None) -> Qwen25VL:
    """Loads an HF directory (safetensors, sharded too, either key layout), an Orbax directory, a training
    workdir (its latest checkpoint) or one of its checkpoint step directories (`<workdir>/checkpoints/<step>`).

    dtype: parameter dtype (None keeps the stored dtypes); compute_dtype: activations (default dtype or f32).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if is_orbax_dir(path):
        if nsa is not None:
            raise CheckpointError("nsa overrides apply to HF checkpoints; edit the Orbax config.json instead")
        return load_orbax(path, dtype=dtype, compute_dtype=compute_dtype)
    if training_step_dir(path) is not None:
        return load_training(path, dtype=dtype, compute_dtype=compute_dtype, nsa=nsa)
    return load_hf(path, dtype=dtype, compute_dtype=compute_dtype, nsa=nsa)


def staging_dir(dst: str) -> str:
    """Where a conversion into `dst` is written before it is renamed to `dst`."""
    return os.path.normpath(dst) + ".partial"


def convert(direction: str, src: str, dst: str, dtype) -> None:
    """Converts `src` into `staging_dir(dst)`, then renames it to `dst` (an empty or absent directory).

    direction "hf_to_orbax": an HF directory into an Orbax one; "orbax_to_hf": an Orbax directory, a training
    workdir (its latest step, with the run's tokenizer.json if it had one) or one of its step directories into
    an HF one. dtype None keeps the stored dtypes. A staging directory left by an interrupted run is removed."""
    staging = staging_dir(dst)
    if os.path.exists(staging):
        log.warning("removing %s, left by an interrupted conversion", staging)
        shutil.rmtree(staging)
    if direction == "hf_to_orbax":
        save_orbax(load_hf(src, dtype=dtype), staging)
    elif training_step_dir(src) is not None:
        save_hf(load_training(src), staging, dtype=dtype)
        tokenizer = training_tokenizer(src)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(staging, TOKENIZER))
    else:
        save_hf(load_orbax(src), staging, dtype=dtype)
    os.replace(staging, dst)
