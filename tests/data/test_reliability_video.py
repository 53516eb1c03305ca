"""Issue 21, items 6 and 10(b): a rotated (portrait phone) video decodes upright, whether the rotation is a
display matrix or a `rotate` tag; a variable-frame-rate video is sampled by presentation time."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from data.decode import VideoDecodeError, read_video

RNG = np.random.default_rng(0)
SOURCE = (RNG.integers(0, 8, (2, 4, 3)) * 32).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # [16, 32, 3] blocks


def _every_frame(total: int, fps: float) -> tuple[np.ndarray, float]:
    return np.arange(total), fps


def _write(path, frames, *, codec="png", pix_fmt="rgb24", rotation=None, tag=None, pts_ms=None) -> None:
    """A lossless video of `frames` (display matrix `rotation` in CCW degrees, or a `rotate` metadata tag)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if tag is not None:
            stream.metadata["rotate"] = tag
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_matrix_rotation_is_applied(tmp_path, rotation):
    _write(tmp_path / "phone.mov", [SOURCE] * 3, rotation=rotation)
    frames = read_video(str(tmp_path / "phone.mov"), _every_frame).frames
    upright = np.rot90(SOURCE, rotation // 90)  # the display matrix turns counter-clockwise
    assert frames.shape == (3, *upright.shape)
    np.testing.assert_array_equal(frames[0], upright)


@pytest.mark.parametrize("tag", ["90", "270"])
def test_rotate_tag_is_applied(tmp_path, tag):
    _write(tmp_path / "phone.mkv", [SOURCE] * 3, codec="ffv1", pix_fmt="bgr0", tag=tag)
    frames = read_video(str(tmp_path / "phone.mkv"), _every_frame).frames
    np.testing.assert_array_equal(frames[-1], np.rot90(SOURCE, -int(tag) // 90))  # the tag turns clockwise


def test_rotate_tag_that_is_not_a_number_is_named(tmp_path):
    _write(tmp_path / "odd.mkv", [SOURCE] * 3, codec="ffv1", pix_fmt="bgr0", tag="sideways")
    with pytest.raises(VideoDecodeError, match=r"odd\.mkv: rotate tag 'sideways'"):
        read_video(str(tmp_path / "odd.mkv"), _every_frame)


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    pts = [100 * i for i in range(16)] + [2500, 3500, 4500, 5500]  # 10 fps for 1.5 s, then 1 fps
    frames = [np.full((16, 32, 3), 12 * i, np.uint8) for i in range(len(pts))]  # frame i holds 12 * i
    _write(tmp_path / "vfr.mov", frames, pts_ms=pts)
    picked = np.linspace(0, len(pts) - 1, 8).round().astype(int)
    sampled = read_video(str(tmp_path / "vfr.mov"), lambda total, fps: (picked, fps))
    times = np.array(pts) / 1000
    nearest = [int(np.argmin(np.abs(times - i * times[-1] / (len(pts) - 1)))) for i in picked]
    assert nearest != picked.tolist()  # by frame number the picks would bunch in the first 1.5 s
    assert [int(f[0, 0, 0]) // 12 for f in sampled.frames] == nearest
    np.testing.assert_allclose(sampled.timestamps, times[nearest], atol=1e-6)
    assert np.diff(sampled.timestamps).max() < np.diff(times[picked]).max()  # 1.1 s against 2 s


def test_constant_frame_rate_keeps_the_sampler_frames(tmp_path):
    frames = [np.full((16, 32, 3), 12 * i, np.uint8) for i in range(20)]
    _write(tmp_path / "cfr.mov", frames)
    picked = np.array([0, 1, 2, 3, 19])
    sampled = read_video(str(tmp_path / "cfr.mov"), lambda total, fps: (picked, fps))
    assert [int(f[0, 0, 0]) // 12 for f in sampled.frames] == picked.tolist()
    np.testing.assert_allclose(sampled.timestamps, picked / 10, atol=1e-6)
