"""Predecode: frames equal an independent decode + torch resize, failures listed, bad annotations stop with
their line, interrupted runs resume without redoing finished shards, TFDS reads the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

import data.predecode as predecode_module
from data.annotations import AnnotationError, load_annotations
from data.decode import DecodeSettings
from data.predecode import predecode
from data.records import decode_record
from data.shards import FAILURES, Manifest, shard_paths
from data.synthetic import generate

from tests import ROOT
from tests.references.video_frames import reference_frames

SETTINGS = DecodeSettings(fps=4, min_frames=4, max_frames=24, min_pixels=28 * 28, max_pixels=56 * 84)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return str(d), generate(d, num_videos=5, seed=3, frames_range=(24, 44))


@pytest.fixture(scope="module")
def frames_dir(source, tmp_path_factory):
    root, ann = source
    out = str(tmp_path_factory.mktemp("frames"))
    predecode(ann, root, out, SETTINGS, shard_size=2, progress=False)
    return out


def records(out_dir: str) -> list[dict]:
    import grain
    src = grain.sources.ArrayRecordDataSource(shard_paths(out_dir))
    return [decode_record(src[i]) for i in range(len(src))]


def test_frames_equal_an_independent_decode_and_resize(source, frames_dir):
    root, ann = source
    recs = records(frames_dir)
    assert [r["id"] for r in recs] == [a.id for a in load_annotations(ann)]
    for rec in recs:
        want, times, fps = reference_frames(os.path.join(root, rec["video"]), SETTINGS)
        np.testing.assert_array_equal(rec["frames"], want)
        assert rec["fps"] == pytest.approx(fps)
        assert rec["second_per_grid_t"] == pytest.approx(2 / fps)
        t, h, w = rec["grid_thw"]
        assert (t * 2, h * 14, w * 14) == want.shape[:3]
        np.testing.assert_allclose(rec["timestamps"], times, atol=1e-6)
        assert rec["conversations"][0]["value"].startswith("<video>\n")


def test_worker_pool_writes_the_same_records(source, frames_dir, tmp_path):
    root, ann = source
    predecode(ann, root, str(tmp_path), SETTINGS, shard_size=2, num_workers=2, progress=False)
    for a, b in zip(records(frames_dir), records(str(tmp_path)), strict=True):
        assert a["id"] == b["id"]
        np.testing.assert_array_equal(a["frames"], b["frames"])


def test_corrupt_and_zero_frame_videos_are_listed_and_skipped(tmp_path):
    root = tmp_path / "src"
    generate(root, num_videos=2, seed=4, frames_range=(24, 30))
    (root / "videos" / "broken.mp4").write_bytes(b"not a video at all" * 50)
    with av.open(str(root / "videos" / "empty.mp4"), "w") as c:  # an mp4 whose encoder got no frame
        stream = c.add_stream("libx264", rate=4)
        stream.width = stream.height = 64
        c.start_encoding()
    entries = json.loads((root / "annotations.json").read_text())
    conv = entries[0]["conversations"]
    entries[1:1] = [{"id": "broken", "video": "videos/broken.mp4", "conversations": conv},
                    {"id": "empty", "video": "videos/empty.mp4", "conversations": conv},
                    {"id": "missing", "video": "videos/missing.mp4", "conversations": conv}]
    (tmp_path / "ann.json").write_text(json.dumps(entries, indent=1))
    manifest = predecode(str(tmp_path / "ann.json"), str(root), str(tmp_path / "out"), SETTINGS, shard_size=2,
                         progress=False)
    listed = [json.loads(line) for line in (tmp_path / "out" / FAILURES).read_text().splitlines()]
    assert [f["id"] for f in listed] == ["broken", "empty", "missing"]
    lines = [a.line for a in load_annotations(tmp_path / "ann.json")]
    assert [f["line"] for f in listed] == lines[1:4]
    assert "zero frames" in listed[1]["error"]
    assert [r["id"] for r in records(str(tmp_path / "out"))] == [entries[0]["id"], entries[4]["id"]]
    assert [s.num_records for s in manifest.shards.values()] == [1, 0, 1]


def test_malformed_annotation_stops_with_its_line(tmp_path):
    good = {"id": "a", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"},
                                                           {"from": "gpt", "value": "A"}]}
    (tmp_path / "ann.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n{oops\n")
    with pytest.raises(AnnotationError, match=r"ann.jsonl:4: malformed annotation: invalid JSON"):
        load_annotations(tmp_path / "ann.jsonl")
    no_answer = good | {"conversations": good["conversations"][:1]}
    text = json.dumps([good, good | {"video": ""}, no_answer], indent=2)
    (tmp_path / "ann.json").write_text(text)
    second = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"][1]
    with pytest.raises(AnnotationError, match=rf"ann.json:{second}: malformed annotation: 'video' must be"):
        load_annotations(tmp_path / "ann.json")
    out = subprocess.run([sys.executable, "-m", "launch.predecode", f"--annotations={tmp_path / 'ann.jsonl'}",
                          f"--video_root={tmp_path}", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "ann.jsonl:4: malformed annotation" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, reason", [
    ({"id": "a", "video": "v", "conversations": [{"from": "gpt", "value": "<video> A"}]}, "human turn"),
    ({"id": "a", "video": "v", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "exactly one <video>"),
    ({"id": "a", "video": "v", "conversations": [{"from": "bot", "value": "A"}]}, r"conversations\[0\]"),
    ({"video": "v", "conversations": []}, "missing field 'id'"),
])
def test_annotation_checks(tmp_path, entry, reason):
    (tmp_path / "a.json").write_text("[\n" + json.dumps(entry) + "\n]")
    with pytest.raises(AnnotationError, match=rf"a.json:2: .*{reason}"):
        load_annotations(tmp_path / "a.json")


def test_interrupted_run_resumes_without_redoing_finished_shards(source, frames_dir, tmp_path, monkeypatch):
    root, ann = source
    out = tmp_path / "out"
    decoded = []
    real = predecode_module.make_record

    def dies_on_the_fourth(annotation, *args):
        if len(decoded) == 3:
            raise KeyboardInterrupt  # killed while writing shard 1
        decoded.append(annotation.id)
        return real(annotation, *args)

    monkeypatch.setattr(predecode_module, "make_record", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        predecode(ann, root, str(out), SETTINGS, shard_size=2, progress=False)
    manifest = Manifest.load(str(out))
    assert sorted(manifest.shards) == [0] and not manifest.complete
    assert any(name.endswith(".tmp") for name in os.listdir(out))  # the unfinished shard
    with pytest.raises(ValueError, match="only 1 of 3 shards"):
        shard_paths(str(out))
    done = out / manifest.shards[0].file
    stamp = os.stat(done).st_mtime_ns

    decoded.clear()
    monkeypatch.setattr(predecode_module, "make_record", lambda a, *args: decoded.append(a.id) or real(a, *args))
    predecode(ann, root, str(out), SETTINGS, shard_size=2, progress=False)
    ids = [a.id for a in load_annotations(ann)]
    assert decoded == ids[2:]  # shard 0 (annotations 0, 1) was not decoded again
    assert os.stat(done).st_mtime_ns == stamp
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    for a, b in zip(records(frames_dir), records(str(out)), strict=True):
        np.testing.assert_array_equal(a["frames"], b["frames"])

    decoded.clear()
    predecode(ann, root, str(out), SETTINGS, shard_size=2, progress=False)  # finished: nothing to do
    assert decoded == []
    with pytest.raises(ValueError, match="other settings"):
        predecode(ann, root, str(out), DecodeSettings(fps=2, min_frames=4, max_frames=24), shard_size=2,
                  progress=False)


def test_tfds_reads_the_shards(source, frames_dir, tmp_path):
    import tensorflow_datasets as tfds

    import data.tfds_builder  # noqa: F401  (registers video_qa_frames)
    ours = records(frames_dir)
    from_dir = tfds.builder_from_directory(frames_dir).as_data_source("train")
    assert len(from_dir) == len(ours)
    # By name: the directory laid out as DATA_DIR/video_qa_frames/1.0.0.
    root, ann = source
    named_dir = tmp_path / "video_qa_frames" / "1.0.0"
    predecode(ann, root, str(named_dir), SETTINGS, shard_size=2, progress=False)
    by_name = tfds.data_source("video_qa_frames", split="train", data_dir=str(tmp_path))
    for i, want in enumerate(ours):
        for got in (from_dir[i], by_name[i]):
            assert got["id"].decode() == want["id"]
            np.testing.assert_array_equal(got["frames"], want["frames"])
            np.testing.assert_array_equal(got["grid_thw"], want["grid_thw"])
            assert [v.decode() for v in got["conversations"]["value"]] == [
                t["value"] for t in want["conversations"]]


def test_tfds_builder_prepares_from_a_manual_directory(tmp_path):
    import tensorflow_datasets as tfds

    from data.decode import make_record
    from data.tfds_builder import VideoQaFrames
    manual = tmp_path / "manual"
    ann = generate(manual, num_videos=2, seed=6, frames_range=(20, 24))
    (manual / "videos" / "broken.mp4").write_bytes(b"\0" * 100)
    entries = json.loads((manual / "annotations.json").read_text())
    entries.append(entries[0] | {"id": "broken", "video": "videos/broken.mp4"})
    (manual / "annotations.json").write_text(json.dumps(entries))
    builder = VideoQaFrames(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    source = builder.as_data_source("train")
    got = {source[i]["id"].decode(): source[i]["frames"] for i in range(len(source))}
    good = [a for a in load_annotations(ann) if a.id != "broken"]
    assert sorted(got) == sorted(a.id for a in good)  # the broken video is skipped
    for a in good:
        np.testing.assert_array_equal(got[a.id], make_record(a, str(manual), DecodeSettings())["frames"])
