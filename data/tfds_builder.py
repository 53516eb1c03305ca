"""A TFDS builder over the pre-decoded shards, so `tfds.data_source` reads them (no TensorFlow needed).

`launch/predecode.py` writes shards under TFDS's file names and, once every shard is done, this
builder's `dataset_info.json` and `features.json` beside them. Then either

    tfds.builder_from_directory(out_dir).as_data_source("train")
    tfds.data_source("video_qa_frames", split="train", data_dir=D)  # with out_dir = D/video_qa_frames/1.0.0
                                                                    # and this module imported

returns a random-access source of decoded records (fields in `data.records`; strings as bytes). The
builder can also prepare the data itself, single-process and with the default `DecodeSettings`, from a
manual directory holding `annotations.json` (or `.jsonl`) and the videos it names:
`VideoQaFrames(data_dir=D, file_format="array_record").download_and_prepare(download_config=...)`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data import records
from data.annotations import load_annotations
from data.decode import DecodeSettings, VideoDecodeError, make_record
from data.shards import DATASET_NAME, Manifest


class VideoQaFrames(tfds.core.GeneratorBasedBuilder):
    """Video QA records with pre-decoded frames (LLaVA-Video-178K style conversations)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Frames sampled with qwen-vl-utils' rule, resized with smart_resize."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put annotations.json (or annotations.jsonl) in LLaVA-Video-178K format and the videos it names, "
        "relative to it, in the manual directory; or write the dataset with launch/predecode.py.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=records.features(),
                                     description="Pre-decoded video frames with QA conversations.")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = dl_manager.manual_dir
        path = next((root / n for n in ("annotations.json", "annotations.jsonl") if (root / n).exists()), None)
        if path is None:
            raise FileNotFoundError(f"{root}: no annotations.json or annotations.jsonl")
        return {"train": self._generate_examples(os.fspath(path), os.fspath(root))}

    def _generate_examples(self, annotations_path: str, video_root: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for annotation in load_annotations(annotations_path):
            try:
                record = make_record(annotation, video_root, DecodeSettings())
            except VideoDecodeError as e:
                logging.warning("skipping %s (line %d): %s", annotation.id, annotation.line, e)
                continue
            yield f"{annotation.line}:{annotation.id}", record


def write_dataset_info(out_dir: str, manifest: Manifest) -> None:
    """Writes TFDS's `dataset_info.json` and `features.json` for the completed shards of `out_dir`."""
    if not manifest.complete:
        raise ValueError(f"{out_dir}: {len(manifest.shards)} of {manifest.num_shards} shards done")
    builder = VideoQaFrames(data_dir=os.path.dirname(os.path.abspath(out_dir)), file_format="array_record")
    shards = [manifest.shards[i] for i in range(manifest.num_shards)]
    template = tfds.core.ShardedFileTemplate(data_dir=out_dir, dataset_name=DATASET_NAME, split=manifest.split,
                                             filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name=manifest.split, shard_lengths=[s.num_records for s in shards],
                                num_bytes=sum(s.num_bytes for s in shards), filename_template=template)
    info = builder.info
    info.set_splits(tfds.core.SplitDict([split]))
    info.write_to_directory(out_dir)
