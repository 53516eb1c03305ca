"""Grain pipeline: processor-equal pixels, answer-only labels, hand-checked packing and mRoPE ids, seeded
shuffle and process sharding, exact resume from a saved state (JSON and Orbax)."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest
import torch

from data import pipeline
from data.decode import DecodeSettings
from data.predecode import predecode
from data.shards import shard_paths
from data.synthetic import generate
from nsa_jax import processing, tiny_config
from nsa_jax.tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                               ByteTokenizer)

from tests.references.video_frames import reference_frames

SETTINGS = DecodeSettings(fps=4, min_frames=4, max_frames=16, min_pixels=28 * 28, max_pixels=56 * 56)
CFG = tiny_config()
TOK = ByteTokenizer(CFG.text.vocab_size)  # its vision tokens have the tiny model's ids
NUM_VIDEOS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ann = generate(d / "src", num_videos=NUM_VIDEOS, seed=5, frames_range=(24, 40))
    predecode(ann, str(d / "src"), str(d / "frames"), SETTINGS, shard_size=4, progress=False)
    with open(ann) as f:
        entries = {e["id"]: e for e in json.load(f)}
    return shard_paths(str(d / "frames")), str(d / "src"), entries


def _batches(paths, **kw):
    args = dict(batch_size=2, seq_len=1600, max_patches=384, samples_per_row=2, seed=0) | kw
    return pipeline.batches(paths, CFG, TOK, **args)


def hf_patchify(frames: np.ndarray) -> np.ndarray:
    """transformers' Qwen2VLVideoProcessor normalisation and patch layout, in torch."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor(processing.OPENAI_CLIP_MEAN) * 255
    std = torch.tensor(processing.OPENAI_CLIP_STD) * 255
    x = (x - mean[:, None, None]) / std[:, None, None]
    t, _, h, w = x.shape
    p = x.view(t // 2, 2, 3, h // 28, 2, 14, w // 28, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(t // 2 * (h // 14) * (w // 14), 3 * 2 * 14 * 14).numpy()


def test_pixels_equal_the_processor_on_the_same_decoded_frames(shards):
    paths, root, entries = shards
    ds = pipeline.samples(paths, CFG, TOK, num_epochs=1)
    seen = []
    for sample in ds:
        frames, _, fps = reference_frames(os.path.join(root, entries[sample["id"]]["video"]), SETTINGS)
        np.testing.assert_array_equal(sample["pixels"], hf_patchify(frames))
        assert tuple(sample["grid"]) == (len(frames) // 2, frames.shape[1] // 14, frames.shape[2] // 14)
        assert sample["second_per_grid_t"] == pytest.approx(2 / fps)
        seen.append(sample["id"])
    assert sorted(seen) == sorted(entries)
    # The packed batch carries the same rows in sample order.
    it = _batches(paths, num_epochs=1, seed=3)
    batch = next(it)
    order = list(pipeline.samples(paths, CFG, TOK, seed=3, num_epochs=1))
    grids = batch["video_grid_thw"]
    used = grids[np.all(grids > 0, axis=1)]
    n = int(np.prod(used, axis=1).sum())
    np.testing.assert_array_equal(batch["pixel_values_videos"][:n], np.concatenate([s["pixels"] for s in order[:len(used)]]))
    assert not batch["pixel_values_videos"][n:].any()


def test_tokens_labels_and_positions_by_hand(shards):
    paths, _, entries = shards
    sample = next(iter(pipeline.samples(paths, CFG, TOK, num_epochs=1)))
    turns = entries[sample["id"]]["conversations"]
    ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
    t, h, w = (int(v) for v in sample["grid"])
    n_video = t * h * w // 4
    question = turns[0]["value"].replace("<video>\n", "")
    head = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|video_pad|>" * n_video + "<|vision_end|>" + question + "<|im_end|>\n<|im_start|>assistant\n")
    assert TOK.decode(ids).startswith(head)
    # Labels: exactly the answer tokens and their <|im_end|>, in order.
    learned = labels != pipeline.IGNORE
    np.testing.assert_array_equal(labels[learned], ids[learned])
    answers = "".join(turn["value"] + "<|im_end|>" for turn in turns if turn["from"] == "gpt")
    assert TOK.decode(ids[learned]) == answers
    # mRoPE: text 0..k-1; the video at k + (0 time step: int(0.5 s) = 0, row, col); text after from k + max + 1.
    k = int(np.flatnonzero(ids == CFG.video_token_id)[0])
    np.testing.assert_array_equal(pos[:, :k], np.tile(np.arange(k), (3, 1)))
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    video = np.stack([np.full(n_video, k), np.tile(rows.ravel(), t) + k, np.tile(cols.ravel(), t) + k])
    np.testing.assert_array_equal(pos[:, k:k + n_video], video)
    after = k + max(h, w) // 2
    np.testing.assert_array_equal(pos[:, k + n_video:], np.tile(np.arange(after, after + len(ids) - k - n_video), (3, 1)))


def _fake(tag: int, n: int, p: int, grid: tuple[int, int, int]) -> dict:
    ids = np.arange(n, dtype=np.int32) + 10 * tag
    return {"id": str(tag), "input_ids": ids, "labels": np.where(np.arange(n) > 0, ids, -100).astype(np.int32),
            "position_ids": np.tile(np.arange(n, dtype=np.int32) + 100 * tag, (3, 1)),
            "pixels": np.full((p, 2), tag, np.float32), "grid": np.array(grid, np.int32), "second_per_grid_t": tag / 2}


def test_packing_by_hand():
    samples = [_fake(1, 3, 4, (1, 2, 2)), _fake(2, 2, 8, (2, 2, 2)), _fake(3, 4, 4, (1, 2, 2)), _fake(4, 1, 4, (1, 2, 2))]
    spec = pipeline.PackSpec(batch_size=2, seq_len=6, max_patches=16, samples_per_row=2, patch_dim=2, pad_id=99)
    it = iter(pipeline.PackedBatchDataset(grain.MapDataset.source(samples).to_iter_dataset(), spec))
    first = next(it)
    # Row 0: samples 1 and 2 (5 tokens); row 1: sample 3 (row 0 holds 2 samples); sample 4's pixels
    # would exceed max_patches (16), so it opens the next batch.
    np.testing.assert_array_equal(first["input_ids"], [[10, 11, 12, 20, 21, 99], [30, 31, 32, 33, 99, 99]])
    np.testing.assert_array_equal(first["labels"], [[-100, 11, 12, -100, 21, -100], [-100, 31, 32, 33, -100, -100]])
    np.testing.assert_array_equal(first["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(first["position_ids"][1], [[100, 101, 102, 200, 201, 0], [300, 301, 302, 303, 0, 0]])
    np.testing.assert_array_equal(first["pixel_values_videos"][:, 0], [1] * 4 + [2] * 8 + [3] * 4)
    np.testing.assert_array_equal(first["video_grid_thw"], [[1, 2, 2], [2, 2, 2], [1, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(first["second_per_grid_ts"], [0.5, 1.0, 1.5, 0.0])
    state = it.get_state()
    second = next(it)
    np.testing.assert_array_equal(second["input_ids"], [[40, 99, 99, 99, 99, 99], [99] * 6])
    np.testing.assert_array_equal(second["pixel_values_videos"][:, 0], [4] * 4 + [0] * 12)
    np.testing.assert_array_equal(second["video_grid_thw"], [[1, 2, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert all(second[k].shape == first[k].shape and second[k].dtype == first[k].dtype for k in first)
    with pytest.raises(StopIteration):
        next(it)
    it.set_state(state)  # the held-back sample 4 is drawn again
    np.testing.assert_array_equal(next(it)["input_ids"], second["input_ids"])


def test_packed_rows_restart_each_sample(shards):
    paths, _, _ = shards
    batch = next(_batches(paths, seed=1))
    by_id = {s["id"]: s for s in pipeline.samples(paths, CFG, TOK, num_epochs=1)}
    order = list(pipeline.samples(paths, CFG, TOK, seed=1, num_epochs=1))
    assert batch["segment_ids"].max() == 2  # two samples share a row
    i = 0
    for r in range(2):
        for seg in range(1, batch["segment_ids"][r].max() + 1):
            sample = by_id[order[i]["id"]]
            m = batch["segment_ids"][r] == seg
            np.testing.assert_array_equal(batch["input_ids"][r, m], sample["input_ids"])
            np.testing.assert_array_equal(batch["labels"][r, m], sample["labels"])
            np.testing.assert_array_equal(batch["position_ids"][:, r, m], sample["position_ids"])
            assert batch["position_ids"][0, r, m][0] == 0
            np.testing.assert_array_equal(batch["video_grid_thw"][2 * r + seg - 1], sample["grid"])
            i += 1


def test_fixed_shapes_and_sample_too_long(shards):
    paths, _, _ = shards
    shapes = {(k, v.shape, str(v.dtype)) for b in _batches(paths, num_epochs=2) for k, v in b.items()}
    assert shapes == {("input_ids", (2, 1600), "int32"), ("labels", (2, 1600), "int32"),
                      ("segment_ids", (2, 1600), "int32"), ("position_ids", (3, 2, 1600), "int32"),
                      ("pixel_values_videos", (384, 1176), "float32"), ("video_grid_thw", (4, 3), "int32"),
                      ("second_per_grid_ts", (4,), "float32")}
    with pytest.raises(pipeline.SampleTooLongError, match="tokens > seq_len=64"):
        next(_batches(paths, seq_len=64))
    with pytest.raises(pipeline.SampleTooLongError, match="pixel rows > max_patches=8"):
        next(_batches(paths, max_patches=8))


def test_tokenizer_with_other_vision_ids_is_refused(shards):
    paths, _, _ = shards
    with pytest.raises(ValueError, match="vision tokens do not match"):
        other = ByteTokenizer(CFG.text.vocab_size, {ENDOFTEXT: 300, IM_START: 301, IM_END: 302, VISION_START: 303,
                                                    VISION_END: 304, IMAGE_PAD: 305, VIDEO_PAD: 306})
        pipeline.batches(paths, CFG, other, batch_size=1, seq_len=1024, max_patches=256)


def test_seeded_shuffle_and_process_sharding(shards):
    paths, _, entries = shards
    ids = lambda **kw: [s["id"] for s in pipeline.samples(paths, CFG, TOK, **kw)]
    assert ids(seed=1, num_epochs=1) == ids(seed=1, num_epochs=1)
    assert ids(seed=1, num_epochs=1) != ids(seed=2, num_epochs=1)
    two = ids(seed=1, num_epochs=2)
    assert sorted(two[:NUM_VIDEOS]) == sorted(two[NUM_VIDEOS:]) == sorted(entries) and two[:NUM_VIDEOS] != two[NUM_VIDEOS:]
    parts = [ids(seed=1, num_epochs=1, process_index=p, process_count=2) for p in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(entries) and len(parts[0]) == len(parts[1]) == NUM_VIDEOS // 2


def test_restored_iterator_yields_the_same_next_batches(shards, tmp_path):
    paths, _, _ = shards
    it = _batches(paths, seed=7)
    next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state survives JSON, as in a checkpoint
    expected = [next(it) for _ in range(3)]
    again = _batches(paths, seed=7)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    import orbax.checkpoint as ocp
    it = _batches(paths, seed=7)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                                data=pipeline.orbax_save_args(it)))
        manager.wait_until_finished()
        fresh = _batches(paths, seed=7)
        restored = manager.restore(1, args=ocp.args.Composite(params=ocp.args.StandardRestore({"w": np.zeros(3)}),
                                                              data=pipeline.orbax_restore_args(fresh)))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
    np.testing.assert_array_equal(next(fresh)["input_ids"], expected[0]["input_ids"])
