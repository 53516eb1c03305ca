"""Checkpoint conversion: HF <-> NNX <-> Orbax, both HF key layouts, clear errors on bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from nsa_jax import CheckpointError, from_pretrained, save_hf, tiny_config
from nsa_jax.conversion import iter_hf_tensors

from tests import ROOT
from tests.references.hf_reference import hf_logits, hf_model


def _tensors(path) -> dict[str, np.ndarray]:
    return dict(iter_hf_tensors(str(path)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model(tiny_config(), seed=3).to(dtype=__import__("torch").bfloat16).save_pretrained(path)
    return path


def _convert(direction, src, dst, dtype="keep"):
    out = subprocess.run([sys.executable, "-m", "launch.convert", f"--direction={direction}", f"--src={src}",
                          f"--dst={dst}", f"--dtype={dtype}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_hf_orbax_hf_is_bit_exact(hf_dir, tmp_path):
    _convert("hf_to_orbax", hf_dir, tmp_path / "orbax")
    _convert("orbax_to_hf", tmp_path / "orbax", tmp_path / "back")
    a, b = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_export_loads_in_transformers_without_missing_keys(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    hf = hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path / "src")
    save_hf(from_pretrained(str(tmp_path / "src")), str(tmp_path / "out"), layout="nested")
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs, ours = hf.state_dict(), loaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k].numpy(), theirs[k].numpy(), err_msg=k)
    ids = np.random.default_rng(0).integers(0, 256, (1, 12))  # (attention kernels may differ: eager vs sdpa)
    np.testing.assert_allclose(hf_logits(loaded.eval(), input_ids=ids), hf_logits(hf, input_ids=ids), atol=1e-5)


def test_nested_layout_and_sharded_index_load(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path / "flat")
    ours = from_pretrained(str(tmp_path / "flat"))
    save_hf(ours, str(tmp_path / "nested"), layout="nested", shard_bytes=200_000)
    files = os.listdir(tmp_path / "nested")
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    keys = list(_tensors(tmp_path / "nested"))
    assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in keys)
    again = from_pretrained(str(tmp_path / "nested"))
    ids = np.random.default_rng(1).integers(0, 256, (1, 9))
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(ours(ids)))


def _rewrite(src, dst, edit):
    os.makedirs(dst)
    tensors = edit(_tensors(src))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_missing_key_is_named(hf_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(hf_dir, tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match="missing keys.*layers.1.mlp.up_proj.weight"):
        from_pretrained(str(tmp_path / "c"))


def test_misshaped_key_is_named(hf_dir, tmp_path):
    key = "visual.blocks.0.attn.qkv.bias"
    _rewrite(hf_dir, tmp_path / "c", lambda t: {**t, key: t[key][:5]})
    with pytest.raises(CheckpointError, match=r"visual.blocks.0.attn.qkv.bias.*shape \(5,\)"):
        from_pretrained(str(tmp_path / "c"))


def test_unexpected_key_and_corrupt_file(hf_dir, tmp_path):
    _rewrite(hf_dir, tmp_path / "u", lambda t: {**t, "model.layers.0.extra.weight": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        from_pretrained(str(tmp_path / "u"))
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00garbage")
    with open(hf_dir / "config.json") as f:
        (tmp_path / "bad" / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(str(tmp_path / "bad"))


def test_convert_refuses_to_overwrite(hf_dir, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    out = subprocess.run([sys.executable, "-m", "launch.convert", "--direction=hf_to_orbax", f"--src={hf_dir}",
                          f"--dst={tmp_path / 'dst'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "not empty" in out.stderr
    assert (tmp_path / "dst" / "keep.txt").read_text() == "x"
    assert json.loads((hf_dir / "config.json").read_text())  # source untouched
