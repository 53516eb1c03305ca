"""The eval preset (nsa_jax.processing "videonsa_eval") against the release's own pipeline on real encoded videos.

The reference is what lmms-eval's VideoNSA wrapper runs: qwen-vl-utils' ``fetch_video`` reading the video with
decord 0.6.0, the backend it (and the fork's copy of it) picks when decord is installed, as the fork installs it
(``len(vr)`` frames, ``vr.get_avg_fps()``, ``smart_nframes``, ``torch.linspace(...).round()`` indices,
``vr.get_batch(indices)``), then torchvision's bicubic antialiased resize of the frames cast to float32, clamp,
round, on an element {"video", "min_pixels", "max_pixels", "fps", "max_frames"} as the wrapper builds it; then
transformers' ``Qwen2_5_VLProcessor`` whose video processor has the wrapper's min / max pixels (its own
``smart_resize``, a float32 bicubic resize, fused rescale + normalize, patchify; fps left at 2.0). Compared
exactly: frame count, fps, frame indices, the frames decord decodes, the fetched frames, sizes, video_grid_thw,
second_per_grid_ts and the float32 pixel_values.

The videos: several sizes, frame rates and durations, a portrait one, a phone one turned upright by its display
matrix, a variable-frame-rate one (decord numbers frames, it never samples by time) and one trimmed at both ends
by an edit list (as ``ffmpeg -ss ... -c copy`` cuts: packets that decode to no frame, so decord's frame count and
numbering part from the decoded frames). More such trims are checked against decord's own ``get_batch``.

One stand-in inside qwen-vl-utils 0.0.14, not in the arithmetic under test: ``smart_resize``. PyPI's copy asserts
max_pixels >= min_pixels, the fork's (lmms-eval's vision_process) accepts the wrapper's 200,704 > 50,176;
transformers' ``smart_resize`` is the fork's rule (which also keeps each side at least 28, moot at these sizes).
"""

import fractions
import math
import os
import struct

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
decord = pytest.importorskip("decord")
vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

from data.decode import read_video_decord  # noqa: E402
from data.video_inputs import fetch_video, read_video_inputs  # noqa: E402
from nsa_jax import processing as presets  # noqa: E402
from nsa_jax.tokenizer import SPECIAL_TOKENS  # noqa: E402

PRESET = presets.PRESETS["videonsa_eval"]

# name -> _write's arguments (height, width, fps, seconds) and options: fetch_video shrinks the frames of the
# first three to <= 50,176 pixels and the processor then enlarges them to >= 200,704; "small" and "slow" go the
# other way round
VIDEOS = {
    "landscape": ((240, 320, 24, 1.0), {}),
    "portrait": ((320, 180, 25, 1.2), {}),
    "ntsc": ((272, 480, fractions.Fraction(24000, 1001), 1.0), {}),
    "small": ((96, 160, 30, 1.0), {}),
    "slow": ((144, 256, 5, 2.4), {}),
    "phone": ((180, 320, 30, 1.0), {"rotation": -90}),  # shown 320 high, 180 wide
    # 31 frames 20, 33, 50 or 100 ms apart (avg_frame_rate 23.6 fps): sampled by frame number, not by time
    "vfr": ((192, 256, 30, 1.0), {"steps_ms": [20, 33, 50, 100, 33, 20] * 5}),
    # 48 frames in GOPs of 8, the edit list drops 3 at the start and the last 11 (the last GOP whole): decord
    # counts the packets, more than the 34 frames that decode
    "trimmed": ((160, 224, 24, 2.0), {"gop": 8, "trim": (3, 11)}),
}


def _write(path, height, width, fps, seconds, seed, *, rotation=None, steps_ms=None, gop=None,
           pix_fmt="yuv420p", trim=None) -> None:
    """A libx264 mp4 of moving gradients with noise (fine detail for the resampler); `rotation`: a display
    matrix (CCW degrees); `steps_ms`: the frames' time steps (a variable frame rate); `trim`: (frames, frames)
    the edit list drops at the start and at the end."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    count = len(steps_ms) + 1 if steps_ms else round(fps * seconds)
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"} if gop else {}
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.thread_count = 1
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if steps_ms:
            stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for t in range(count):
            base = np.stack([xx * 3 + t * 11, yy * 5 - t * 7, (xx + yy) * 2 + t * 3], axis=-1) % 256
            frame = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if steps_ms:
                frame.pts, frame.time_base = sum(steps_ms[:t]), fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    if trim:
        _trim(path, *trim, fps)


def _boxes(data: bytes, start: int, end: int, path: str = ""):
    """(offset, type path) of the mp4 boxes in data[start:end], into the containers on the way to elst."""
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        yield start, f"{path}/{kind.decode('latin-1')}"
        if kind in (b"moov", b"trak", b"edts", b"mdia"):
            yield from _boxes(data, start + 8, start + size, f"{path}/{kind.decode('latin-1')}")
        start += size


def _trim(path: str, start_frames: int, end_frames: int, fps) -> None:
    """Moves the mp4's edit list start `start_frames` later and its end `end_frames` earlier (libx264 writes one
    edit list entry; the frames outside it are demuxed and decoded as references, but not shown)."""
    data = bytearray(open(path, "rb").read())
    scale = {}
    for offset, kind in _boxes(data, 0, len(data)):
        if kind in ("/moov/mvhd", "/moov/trak/mdia/mdhd"):  # version 0: the timescale after two dates
            scale[kind] = struct.unpack(">I", data[offset + 20:offset + 24])[0]
        if kind.endswith("/elst"):
            elst = offset
    segment, media_time = struct.unpack(">II", data[elst + 16:elst + 24])
    movie, media = scale["/moov/mvhd"], scale["/moov/trak/mdia/mdhd"]
    segment -= math.ceil((start_frames + end_frames) * movie / fps)  # the last frame kept ends in it
    struct.pack_into(">II", data, elst + 16, segment, media_time + round(start_frames * media / fps))
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for seed, (name, (args, options)) in enumerate(VIDEOS.items()):
        paths[name] = str(root / f"{name}.mp4")
        _write(paths[name], *args, seed, **options)
    return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A function path -> (fetch_video's frames and metadata, the processor's outputs), as the wrapper runs them."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Describe the video."] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(tokenizer_dir, "tokenizer.json"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vision_process, "get_video_reader_backend", lambda: "decord")  # as FORCE_QWENVL_VIDEO_READER
        mp.setattr(vision_process, "smart_resize", hf_smart_resize)
        mp.setattr(Qwen2VLVideoProcessor, "size", dict(Qwen2VLVideoProcessor.size))  # __init__ writes into it
        # Qwen2_5_VLProcessor.from_pretrained(..., max_pixels=..., min_pixels=...) hands both to its video processor
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(),
            tokenizer=Qwen2TokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                         unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>"),
            video_processor=Qwen2VLVideoProcessor(min_pixels=PRESET.min_pixels, max_pixels=PRESET.max_pixels))

        def run(path):
            element = {"type": "video", "video": path, "max_pixels": PRESET.max_pixels,
                       "min_pixels": PRESET.min_pixels, "fps": PRESET.fps, "max_frames": PRESET.max_frames}
            (video, metadata), sample_fps = vision_process.fetch_video(
                element, return_video_sample_fps=True, return_video_metadata=True)
            assert metadata["video_backend"] == "decord"  # no silent fallback to another reader
            text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"
            out = processor(text=[text], videos=[video], padding=True, return_tensors="pt")
            return video, metadata, sample_fps, out

        yield run


def _decoded_count(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("name", list(VIDEOS))
def test_eval_pixels_equal_qwen_vl_utils_with_decord_and_processor(name, videos, reference):
    path = videos[name]
    video, metadata, sample_fps, ref = reference(path)
    fetched = fetch_video(path, PRESET)

    # decord's frame count and fps, and the indices qwen-vl-utils picks from them
    indices, fps = presets.frame_indices(fetched.total_frames, fetched.video_fps, PRESET)
    assert (fetched.total_frames, fetched.video_fps) == (metadata["total_num_frames"], metadata["fps"])
    np.testing.assert_array_equal(indices, metadata["frames_indices"])
    assert fps == fetched.fps == sample_fps
    if name == "trimmed":  # decord counts packets, and some decode to no frame
        assert fetched.total_frames > _decoded_count(path) == 34
    # the frames decord decodes for those indices, before any resize
    decoded = read_video_decord(path, lambda total, video_fps: (indices, fps)).frames
    np.testing.assert_array_equal(decoded, decord.VideoReader(path).get_batch(indices.tolist()).asnumpy())
    # fetch_video's frames: the resize rounded to uint8 values, handed on as float32
    reference_frames = video.permute(0, 2, 3, 1).numpy()
    assert fetched.frames.shape == reference_frames.shape
    assert np.array_equal(reference_frames, reference_frames.round().clip(0, 255))
    np.testing.assert_array_equal(fetched.frames, reference_frames.astype(np.uint8))

    pixels, grid, second_per_grid_t = presets.processor_video(fetched.frames, PRESET)  # as read_video_inputs
    np.testing.assert_array_equal(grid, ref["video_grid_thw"].numpy())
    assert [second_per_grid_t] == torch.as_tensor(ref["second_per_grid_ts"]).tolist() == [1.0]
    assert pixels.dtype == ref["pixel_values_videos"].numpy().dtype == np.float32
    assert np.array_equal(pixels, ref["pixel_values_videos"].numpy())  # bit for bit


def test_read_video_inputs_is_fetch_video_then_the_processor(videos):
    inputs = read_video_inputs(videos["small"], PRESET)
    pixels, grid, second_per_grid_t = presets.processor_video(fetch_video(videos["small"], PRESET).frames, PRESET)
    assert np.array_equal(inputs.pixel_values_videos, pixels)
    np.testing.assert_array_equal(inputs.video_grid_thw, grid)
    assert inputs.second_per_grid_ts == [second_per_grid_t]


# (B-frames, GOP, frames, frames the edit list drops at the start, at the end): how decord numbers the frames of
# a trimmed video depends on where its seeks land, which keyframes they cross and what it does at the end of file
TRIMS = [(True, 7, 61, 3, 13), (True, 5, 60, 2, 6), (True, 12, 97, 5, 0), (True, 30, 90, 0, 13),
         (False, 7, 61, 3, 13)]


@pytest.mark.parametrize("bframes, gop, frames, start, end", TRIMS)
def test_trimmed_video_frames_equal_decords(tmp_path, bframes, gop, frames, start, end):
    """Frames read as decord's get_batch reads them, for qwen-vl-utils' indices at several frame counts and for
    scattered ones, on small trimmed videos (a fresh VideoReader each time: its state depends on the batch)."""
    path = str(tmp_path / "trimmed.mp4")
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", **({} if bframes else {"bf": "0"})}
    rng = np.random.default_rng(gop)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.thread_count = 1
        for _ in range(frames):  # noise: every frame tells itself apart
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    _trim(path, start, end, 24)
    total = len(decord.VideoReader(path))  # the packets the demuxer keeps (mov drops some past the edit's end)
    assert _decoded_count(path) < total
    batches = [torch.linspace(0, total - 1, n).round().long().tolist() for n in (4, 8, 16, 24)]
    batches += [sorted(rng.choice(total, 6, replace=False).tolist()) for _ in range(4)] + [[total - 1]]
    for batch in batches:
        ours = read_video_decord(path, lambda count, fps: (np.array(batch), fps))
        assert ours.total_frames == total
        np.testing.assert_array_equal(ours.frames, decord.VideoReader(path).get_batch(batch).asnumpy(),
                                      err_msg=str(batch))


def test_ten_bit_video_frame_numbers_equal_decords(tmp_path):
    """A 10-bit video: frame count, fps, indices and sizes as decord has them. Its pixel values differ (README):
    decord's FFmpeg 4.1 and PyAV's FFmpeg convert samples of more than 8 bits to rgb24 differently."""
    path = str(tmp_path / "ten_bit.mp4")
    _write(path, 144, 256, 24, 1.0, 0, pix_fmt="yuv420p10le")
    vr = decord.VideoReader(path)
    sampled = read_video_decord(path, lambda total, fps: presets.frame_indices(total, fps, PRESET))
    indices, fps = presets.frame_indices(len(vr), vr.get_avg_fps(), PRESET)
    assert (sampled.total_frames, sampled.video_fps, sampled.fps) == (len(vr), vr.get_avg_fps(), fps)
    assert sampled.frames.shape == vr.get_batch(indices.tolist()).asnumpy().shape
