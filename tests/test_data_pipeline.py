"""Predecode + Grain pipeline: same arrays as the processor, labels on answers, resumable iterator, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import pipeline
from data.annotations import AnnotationError, load_annotations
from data.decode import DecodeSettings, read_video
from data.predecode import predecode
from data.shards import Manifest, shard_paths
from data.synthetic import generate, write_mp4
from nsa_jax import get_rope_index, processing, tiny_config
from nsa_jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = DecodeSettings(fps=4, min_frames=4, max_frames=24, min_pixels=3136, max_pixels=4704)
CFG = tiny_config()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ann = generate(d / "src", num_videos=5, seed=3, frames_range=(24, 40))
    predecode(ann, str(d / "src"), str(d / "frames"), SETTINGS, shard_size=2, progress=False)
    return d, ann


def _batches(d, **kw):
    args = dict(batch_size=2, seq_len=1024, max_patches=1024, seed=0) | kw
    return pipeline.batches(shard_paths(str(d / "frames")), CFG, ByteTokenizer(), **args)


def test_pipeline_arrays_equal_the_processor_on_the_same_frames(dataset):
    d, ann = dataset
    first = load_annotations(ann)
    it = pipeline.batches(shard_paths(str(d / "frames")), CFG, ByteTokenizer(), batch_size=1, seq_len=1024,
                          max_patches=1024, seed=0, num_epochs=1)
    seen = 0
    by_video = {a.video: a for a in first}
    for batch, record_id in zip(it, range(len(first))):
        grid = batch["video_grid_thw"][0]
        n = int(np.prod(grid))
        # Which video is this? Match by grid and pixels against an independent decode + processor run.
        matches = []
        for a in by_video.values():
            sampler = lambda total, fps: processing.sample_frame_indices(total, fps, fps=4, min_frames=4, max_frames=24)
            frames = read_video(str(d / "src" / a.video), sampler).frames
            h, w = processing.smart_resize(*frames.shape[1:3], min_pixels=3136, max_pixels=4704)
            pv, g, spg = processing.preprocess_video(processing.resize_torchvision(frames, h, w), 4.0,
                                                     min_pixels=3136, max_pixels=4704)
            if tuple(g[0]) == tuple(grid) and np.array_equal(pv, batch["pixel_values_videos"][:n]):
                matches.append(a)
        assert len(matches) == 1
        assert not batch["pixel_values_videos"][n:].any()
        seen += 1
    assert seen == len(first)


def test_labels_are_the_answer_tokens_and_positions_the_rope_index(dataset):
    d, _ = dataset
    batch = next(_batches(d))
    tok = ByteTokenizer()
    for r in range(2):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        learned = labels >= 0
        np.testing.assert_array_equal(labels[learned], ids[learned])
        # Every answered span ends with <|im_end|>; no user text or video token is learned.
        assert (ids[learned] == tok.special_ids["<|im_end|>"]).sum() == 4
        assert not np.isin(ids[learned], [CFG.video_token_id, tok.special_ids["<|im_start|>"]]).any()
        text = tok.decode(ids[learned])
        assert "<|im_end|>" in text and "user" not in text
    grids = batch["video_grid_thw"]
    pos, _ = get_rope_index(batch["input_ids"], CFG, video_grid_thw=grids, second_per_grid_ts=[0.5, 0.5])
    np.testing.assert_array_equal(batch["position_ids"], pos)  # the synthetic videos are sampled at 4 fps


def test_restored_iterator_yields_the_same_next_batches(dataset):
    d, _ = dataset
    it = _batches(d, seed=7)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = _batches(d, seed=7)
    again.set_state(json.loads(json.dumps(state)))  # the state survives JSON, as in the checkpoint
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_process_sharding_splits_records(dataset):
    d, _ = dataset
    ids = []
    for p in range(2):
        it = pipeline.batches(shard_paths(str(d / "frames")), CFG, ByteTokenizer(), batch_size=1, seq_len=1024,
                              max_patches=1024, seed=0, process_index=p, process_count=2, num_epochs=1)
        ids.append([tuple(b["video_grid_thw"][0]) + (float(b["pixel_values_videos"].sum()),) for b in it])
    assert len(ids[0]) + len(ids[1]) == 5 and not set(ids[0]) & set(ids[1])


def test_too_long_sample_names_it(dataset):
    d, _ = dataset
    with pytest.raises(pipeline.SampleTooLongError, match="tokens > seq_len=64"):
        next(_batches(d, seq_len=64))


def test_corrupt_and_empty_videos_are_listed_and_skipped(tmp_path):
    generate(tmp_path / "src", num_videos=2, seed=4, frames_range=(24, 30))
    (tmp_path / "src" / "videos" / "broken.mp4").write_bytes(b"not a video at all")
    write_mp4(str(tmp_path / "src" / "videos" / "empty.mp4"), np.zeros((0, 64, 64, 3), np.uint8), fps=4)
    with open(tmp_path / "src" / "annotations.json") as f:
        entries = json.load(f)
    conv = entries[0]["conversations"]
    entries += [{"id": "broken", "video": "videos/broken.mp4", "conversations": conv},
                {"id": "empty", "video": "videos/empty.mp4", "conversations": conv}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    manifest = predecode(str(tmp_path / "ann.json"), str(tmp_path / "src"), str(tmp_path / "out"), SETTINGS,
                         shard_size=2, progress=False)
    failed = sorted(f["id"] for s in manifest.shards.values() for f in s.failures)
    assert failed == ["broken", "empty"]
    assert sum(s.num_records for s in manifest.shards.values()) == 2


def test_malformed_annotation_stops_with_its_line(tmp_path):
    good = {"id": "a", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"},
                                                           {"from": "gpt", "value": "A"}]}
    (tmp_path / "ann.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "b"}) + "\n{oops\n")
    with pytest.raises(AnnotationError, match=r"ann.jsonl:3: malformed annotation"):
        load_annotations(tmp_path / "ann.jsonl")
    out = subprocess.run([sys.executable, "-m", "launch.predecode", f"--annotations={tmp_path / 'ann.jsonl'}",
                          f"--video_root={tmp_path}", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "ann.jsonl:3: malformed annotation" in out.stderr


def test_predecode_resumes_without_redoing_finished_shards(dataset, tmp_path):
    d, ann = dataset
    out = tmp_path / "frames"
    predecode(ann, str(d / "src"), str(out), SETTINGS, shard_size=2, progress=False)
    manifest = Manifest.load(str(out))
    first = manifest.shards[0].file
    stamp = os.stat(out / first).st_mtime_ns
    # Forget the last shard, as if the run had been killed while writing it, and run again.
    del manifest.shards[max(manifest.shards)]
    manifest.save(str(out))
    predecode(ann, str(d / "src"), str(out), SETTINGS, shard_size=2, progress=False)
    assert os.stat(out / first).st_mtime_ns == stamp
    assert Manifest.load(str(out)).complete


def test_tfds_data_source_reads_the_same_records(dataset):
    import tensorflow_datasets as tfds

    from data.records import decode_record
    d, ann = dataset
    source = tfds.builder_from_directory(str(d / "frames")).as_data_source("train")
    assert len(source) == len(load_annotations(ann))
    import grain
    raw = grain.sources.ArrayRecordDataSource(shard_paths(str(d / "frames")))
    for i in range(len(source)):
        ours, theirs = decode_record(raw[i]), source[i]
        assert theirs["id"].decode() == ours["id"]
        np.testing.assert_array_equal(theirs["frames"], ours["frames"])
        np.testing.assert_array_equal(theirs["grid_thw"], ours["grid_thw"])
