"""The eval preset (nsa_jax.presets "videonsa_eval") against the release's own pipeline on real encoded videos.

The reference is what lmms-eval's VideoNSA wrapper runs: qwen-vl-utils' ``fetch_video`` (``smart_nframes``,
``torch.linspace(...).round()`` indices, torchvision's bicubic antialiased resize of the frames cast to float32,
clamp, round) on an element {"video", "min_pixels", "max_pixels", "fps", "max_frames"} as the wrapper builds it,
then transformers' ``Qwen2_5_VLProcessor`` whose video processor has the wrapper's min / max pixels (its own
``smart_resize``, a float32 bicubic resize, fused rescale + normalize, patchify; fps left at 2.0). Everything is
compared exactly: frame indices, sizes, video_grid_thw, second_per_grid_ts and the float32 pixel_values.

Two stand-ins inside qwen-vl-utils 0.0.14, neither in the arithmetic under test:
* decoding: torchvision 0.29 no longer has ``io.read_video`` (the fork prefers decord, absent here); every frame
  is decoded with PyAV as rgb24, as torchvision's PyAV reader did and data.decode does;
* ``smart_resize``: PyPI's copy asserts max_pixels >= min_pixels, the fork's (lmms-eval's vision_process) accepts
  the wrapper's 200,704 > 50,176; transformers' ``smart_resize`` is the fork's rule (which also keeps each side
  at least 28, moot at these sizes).
"""

import fractions
import os

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

from data.video_inputs import fetch_video, read_video_inputs  # noqa: E402
from nsa_jax import presets  # noqa: E402
from nsa_jax.tokenizer import SPECIAL_TOKENS  # noqa: E402

PRESET = presets.PRESETS["videonsa_eval"]

# (name, height, width, fps, seconds): fetch_video shrinks the frames of the first three to <= 50,176 pixels and
# the processor then enlarges them to >= 200,704; the other two go the other way round
VIDEOS = [
    ("landscape", 240, 320, 24, 2.0),
    ("portrait", 320, 180, 25, 1.2),
    ("ntsc", 272, 480, fractions.Fraction(24000, 1001), 1.0),
    ("small", 96, 160, 30, 1.0),
    ("slow", 144, 256, 5, 4.0),
]


def _write(path: str, height: int, width: int, fps, seconds: float, seed: int) -> None:
    """A libx264 mp4 of moving gradients with noise (fine detail for the resampler)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for t in range(round(fps * seconds)):
            base = np.stack([xx * 3 + t * 11, yy * 5 - t * 7, (xx + yy) * 2 + t * 3], axis=-1) % 256
            frame = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _read_video_pyav(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="THWC"):
    """torchvision.io.read_video's contract, decoding every frame with PyAV (see the module docstring)."""
    assert (start_pts, end_pts, pts_unit) == (0.0, None, "sec")
    with av.open(path) as container:
        stream = container.streams.video[0]
        video = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]))
        fps = float(stream.average_rate)
    return (video.permute(0, 3, 1, 2) if output_format == "TCHW" else video), torch.empty(1, 0), {"video_fps": fps}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for seed, (name, height, width, fps, seconds) in enumerate(VIDEOS):
        paths[name] = str(root / f"{name}.mp4")
        _write(paths[name], height, width, fps, seconds, seed)
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
        mp.setattr(vision_process.io, "read_video", _read_video_pyav, raising=False)
        mp.setattr(vision_process, "get_video_reader_backend", lambda: "torchvision")
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
            text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"
            out = processor(text=[text], videos=[video], padding=True, return_tensors="pt")
            return video, metadata, sample_fps, out

        yield run


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
def test_eval_pixels_equal_qwen_vl_utils_and_processor(name, videos, reference):
    video, metadata, sample_fps, ref = reference(videos[name])
    fetched = fetch_video(videos[name], PRESET)

    indices, fps = presets.frame_indices(fetched.total_frames, fetched.video_fps, PRESET)
    assert fetched.total_frames == metadata["total_num_frames"]
    np.testing.assert_array_equal(indices, metadata["frames_indices"].numpy())
    assert fps == sample_fps
    # fetch_video's frames: the resize rounded to uint8 values, handed on as float32
    reference_frames = video.permute(0, 2, 3, 1).numpy()
    assert fetched.frames.shape == reference_frames.shape
    assert np.array_equal(reference_frames, reference_frames.round().clip(0, 255))
    np.testing.assert_array_equal(fetched.frames, reference_frames.astype(np.uint8))

    inputs = read_video_inputs(videos[name], PRESET)
    np.testing.assert_array_equal(inputs.video_grid_thw, ref["video_grid_thw"].numpy())
    assert inputs.second_per_grid_ts == torch.as_tensor(ref["second_per_grid_ts"]).tolist() == [1.0]
    assert inputs.pixel_values_videos.dtype == ref["pixel_values_videos"].numpy().dtype == np.float32
    assert np.array_equal(inputs.pixel_values_videos, ref["pixel_values_videos"].numpy())  # bit for bit

