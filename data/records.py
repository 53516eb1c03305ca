"""The record format of the pre-decoded shards: one TFDS `FeaturesDict`, serialised as `tf.train.Example`.

The same bytes are read by the Grain pipeline (`decode_record`) and by `tfds.data_source` (the features
are written beside the shards as `features.json`). No TensorFlow is needed: TFDS serialises and parses
with its own protobuf copy. Fields of a decoded record:

    id                 str
    video              str     the annotation's video path
    frames             uint8   [T, H, W, 3]  sampled and resized (H, W multiples of 28)
    grid_thw           int32   [3]           the processor's (grid_t, grid_h, grid_w) of these frames
    timestamps         float32 [T]           seconds from the first decoded frame
    fps                float32               sampling rate actually used (frames / duration)
    second_per_grid_t  float32               temporal_patch_size / fps
    conversations      list of {"from": "human"|"gpt", "value": str}, `<video>` marks the video
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow_datasets as tfds


@functools.cache
def features() -> tfds.features.FeaturesDict:
    """The TFDS features of one record."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "id": text,
        "video": text,
        "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                       encoding=tfds.features.Encoding.BYTES),
        "grid_thw": tfds.features.Tensor(shape=(3,), dtype=np.int32),
        "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "second_per_grid_t": tfds.features.Scalar(dtype=np.float32),
        "conversations": tfds.features.Sequence({"from": text, "value": text}),
    })


def encode_record(record: dict[str, Any]) -> bytes:
    """Serialises a record (fields as in the module docstring)."""
    return features().serialize_example(record)


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses serialised bytes back into a record with Python strings and numpy arrays."""
    raw = features().deserialize_example_np(data)
    turns = raw["conversations"]
    return {
        "id": raw["id"].decode(),
        "video": raw["video"].decode(),
        "frames": raw["frames"],
        "grid_thw": raw["grid_thw"],
        "timestamps": raw["timestamps"],
        "fps": float(raw["fps"]),
        "second_per_grid_t": float(raw["second_per_grid_t"]),
        "conversations": [{"from": f.decode(), "value": v.decode()} for f, v in zip(turns["from"], turns["value"])],
    }
