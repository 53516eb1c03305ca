"""Issue 21, shards on disk: a deleted, truncated or corrupted shard is named (before training, or when its
record is read) and predecode writes it again; edited annotations are not matched to the old shards."""

from __future__ import annotations

import json
import os

import pytest

from data import pipeline
from data.decode import DecodeSettings
from data.errors import DataError
from data.predecode import predecode
from data.shards import Manifest, ShardError, shard_paths
from data.synthetic import generate
from nsa_jax import tiny_config
from nsa_jax.tokenizer import ByteTokenizer

SETTINGS = DecodeSettings(fps=4, min_frames=4, max_frames=4, min_pixels=28 * 28, max_pixels=3136)


@pytest.fixture
def made(tmp_path):
    """(annotation path, video root, out_dir) of 3 videos predecoded one per shard."""
    root = str(tmp_path / "src")
    ann = generate(root, num_videos=3, seed=2, frames_range=(8, 10))
    out = str(tmp_path / "frames")
    predecode(ann, root, out, SETTINGS, shard_size=1, progress=False)
    return ann, root, out


def test_deleted_and_truncated_shards_are_named_and_rewritten(made):
    ann, root, out = made
    paths = shard_paths(out)
    kept = os.stat(paths[0]).st_mtime_ns
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) // 2)
    os.remove(paths[2])
    with pytest.raises(ShardError, match=rf"2 of 3 shards do not match .*manifest.json: {paths[1]}: \d+ bytes, the "
                                         rf"manifest says \d+ \(truncated or replaced\); {paths[2]}: missing"):
        shard_paths(out)
    predecode(ann, root, out, SETTINGS, shard_size=1, progress=False)
    assert shard_paths(out) == paths and os.stat(paths[0]).st_mtime_ns == kept  # only the bad ones rewritten
    assert sum(s.num_records for s in Manifest.load(out).shards.values()) == 3


def test_edited_annotations_are_refused(made):
    ann, root, out = made
    before = {p: os.stat(p).st_mtime_ns for p in shard_paths(out)}
    entries = json.loads(open(ann).read())
    entries[1]["conversations"][1]["value"] = "an edited answer"  # same count, other content
    with open(ann, "w") as f:
        json.dump(entries, f)
    with pytest.raises(DataError, match=r"holds shards made with other annotations_sha256 .*use a new --out_dir"):
        predecode(ann, root, out, SETTINGS, shard_size=1, progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in shard_paths(out)} == before


def test_a_corrupt_record_names_its_file(made):
    _, _, out = made
    paths = shard_paths(out)
    with open(paths[1], "r+b") as f:  # same size and index: only reading the record finds it
        f.seek(8192)  # inside the first chunk: the record data
        f.write(b"\xff" * 64)
    assert shard_paths(out) == paths
    cfg = tiny_config()
    with pytest.raises(ShardError, match=rf"{paths[1]}: record 0 is unreadable"):
        list(pipeline.samples(paths, cfg, ByteTokenizer(cfg.text.vocab_size), num_epochs=1))


def test_a_second_predecode_into_the_same_directory_is_refused(made):
    import fcntl

    from data.shards import LOCK
    ann, root, out = made
    before = {p: os.stat(p).st_mtime_ns for p in shard_paths(out)}
    os.remove(shard_paths(out)[0])  # work the second run would do
    with open(os.path.join(out, LOCK), "a+") as held:  # the first run, still writing
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("12345")
        held.flush()
        with pytest.raises(DataError, match=rf"{out}: another predecode is writing here \(lock .*{LOCK} held by "
                                            r"pid 12345\)"):
            predecode(ann, root, out, SETTINGS, shard_size=1, progress=False)
        assert not any(name.endswith(".tmp") for name in os.listdir(out))
    predecode(ann, root, out, SETTINGS, shard_size=1, progress=False)  # once it is done, a rerun proceeds
    after = {p: os.stat(p).st_mtime_ns for p in shard_paths(out)}
    assert list(after) == list(before) and list(after.values())[1:] == list(before.values())[1:]
