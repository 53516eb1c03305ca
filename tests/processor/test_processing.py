"""nsa_jax.processing against transformers 4.57's Qwen2.5-VL processors and hand-worked cases.

transformers' torchvision-based processors (``Qwen2VLVideoProcessor``, ``Qwen2VLImageProcessorFast``)
import torchvision, which the test environment may lack. Then a stand-in for the three torchvision functions it calls on CPU is installed: ``resize``
(uint8 bicubic -> torch's native uint8 antialiased kernel, as ``torchvision.transforms.v2.functional
.resize_image`` does on CPU), ``normalize`` (``sub(mean).div_(std)``) and ``grayscale_to_rgb``;
everything else (sampling, smart_resize, fused normalization constants, padding, patch order) is
transformers' own code. With torchvision installed the real one is used.
"""

import enum
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata

from nsa_jax import chat, processing
from nsa_jax.tokenizer import SPECIAL_TOKENS, load_tokenizer

from tests.references.hf_reference import QWEN_TEMPLATE

RNG = np.random.default_rng(0)


def _uint8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _torchvision_stub() -> dict[str, types.ModuleType]:
    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True, **_):
        assert interpolation == InterpolationMode.BICUBIC and image.dtype == torch.uint8 and image.device.type == "cpu"
        *lead, c, h, w = image.shape
        if tuple(size) == (h, w):
            return image
        out = torch.nn.functional.interpolate(
            image.reshape(-1, c, h, w), size=list(size), mode="bicubic", align_corners=False, antialias=antialias
        )
        return out.reshape(*lead, c, *size)

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div_(std)

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.InterpolationMode, functional.resize, functional.normalize = InterpolationMode, resize, normalize
    functional.grayscale_to_rgb = lambda image: image
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = functional
    transforms = types.ModuleType("torchvision.transforms")
    transforms.InterpolationMode, transforms.v2 = InterpolationMode, v2
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.v2": v2,
            "torchvision.transforms.v2.functional": functional}


TORCHVISION_MODULES = {"video": "transformers.models.qwen2_vl.video_processing_qwen2_vl",
                       "image": "transformers.models.qwen2_vl.image_processing_qwen2_vl_fast"}


def _torchvision_classes() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        video=importlib.import_module(TORCHVISION_MODULES["video"]).Qwen2VLVideoProcessor,
        image_fast=importlib.import_module(TORCHVISION_MODULES["image"]).Qwen2VLImageProcessorFast,
    )


@pytest.fixture(scope="module")
def tv_processors():
    """transformers' torchvision-based processors (with the torchvision stand-in when it is absent)."""
    if importlib.util.find_spec("torchvision") is not None:
        yield _torchvision_classes()
        return
    import transformers
    import transformers.image_processing_utils_fast as fast
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    stub = _torchvision_stub()
    functional = stub["torchvision.transforms.v2.functional"]
    with pytest.MonkeyPatch.context() as mp:
        for module_name, module in stub.items():
            mp.setitem(sys.modules, module_name, module)
        mp.setattr(fast, "F", functional, raising=False)
        mp.setattr(video_utils, "F", functional, raising=False)
        mp.setattr(fast, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BICUBIC: functional.InterpolationMode.BICUBIC})
        mp.setattr(transformers, "BaseVideoProcessor", video_utils.BaseVideoProcessor)  # else a dummy class
        for name in TORCHVISION_MODULES.values():
            mp.delitem(sys.modules, name, raising=False)
        yield _torchvision_classes()
        for name in TORCHVISION_MODULES.values():
            sys.modules.pop(name, None)


# --- smart_resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw, pixels, expected",
    [
        ((100, 137), {}, (112, 140)),  # round(3.57) = 4, round(4.89) = 5
        ((70, 70), {}, (56, 56)),  # 70 / 28 = 2.5 rounds half to even: 2
        ((42, 42), {}, (56, 56)),  # 1.5 -> 2
        ((30, 40), {}, (56, 84)),  # 28*28 < 56*56: beta = sqrt(3136/1200), ceil(1.73) = 2, ceil(2.31) = 3
        ((480, 640), {"max_pixels": 50176}, (168, 252)),  # beta = sqrt(307200/50176): floor(6.93), floor(9.24)
        # beta = sqrt(20000/3136): height floor(0.28) is raised to one factor, width floor(14.1); the area
        # then exceeds max_pixels, as in transformers
        ((20, 1000), {"max_pixels": 28 * 28 * 4}, (28, 392)),
    ],
)
def test_smart_resize_hand_worked(hw, pixels, expected):
    assert processing.smart_resize(*hw, **pixels) == expected


def test_smart_resize_matches_transformers():
    for h, w in RNG.integers(10, 3000, (300, 2)):
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 50176), (3136, 12845056)]:
            assert processing.smart_resize(int(h), int(w), 28, lo, hi) == hf_smart_resize(int(h), int(w), 28, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        processing.smart_resize(10, 2500)


# --- frame sampling --------------------------------------------------------------------------------


def test_sample_frame_indices_hand_worked():
    idx, fps = processing.sample_frame_indices(100, 25.0, fps=2.0)  # 4 s at 2 fps: 8 frames over 0..99
    np.testing.assert_array_equal(idx, [0, 14, 28, 42, 57, 71, 85, 99])
    assert fps == 2.0
    idx, fps = processing.sample_frame_indices(100, 25.0, fps=2.0, rule="transformers")  # step 12.5
    np.testing.assert_array_equal(idx, [0, 12, 25, 37, 50, 62, 75, 87])
    idx, fps = processing.sample_frame_indices(10, 30.0, fps=2.0)  # 0.67 frames, raised to min_frames 4
    np.testing.assert_array_equal(idx, [0, 3, 6, 9])
    assert fps == pytest.approx(12.0)  # 4 frames over 1/3 s
    assert len(processing.sample_frame_indices(1000, 30.0, fps=4.0, max_frames=64)[0]) == 64
    assert len(processing.sample_frame_indices(7, 1.0, fps=2.0)[0]) == 6  # 14 wanted, 7 frames: floor to 6
    assert len(processing.sample_frame_indices(11, 1.0, fps=1.0, min_frames=3)[0]) == 10  # 11 -> even 10
    # the transformers rule inherits torch.arange's extra step: 14 frames asked, 15 returned
    assert len(processing.sample_frame_indices(17, 17.0, fps=14.0, rule="transformers")[0]) == 15
    # linspace(0, 5, 3) = [0, 2.5, 5]: halves round to even, as torch.round (only odd counts hit .5)
    np.testing.assert_array_equal(processing.sample_frame_indices(6, 1.0, 0.5, 1, temporal_patch_size=1)[0], [0, 2, 5])
    with pytest.raises(ValueError):
        processing.sample_frame_indices(1, 30.0)


def test_sample_frame_indices_match_torch_and_transformers(tv_processors):
    # exact rounding of linspace equals torch's float32 linspace here; for thousands of frames float32
    # can move a value across .5 (see the docstring)
    for total in range(2, 400, 13):
        for n in range(2, total + 1, 6):
            idx, _ = processing.sample_frame_indices(total, 1.0, fps=n / total, min_frames=2, max_frames=10**6)
            expected = torch.linspace(0, total - 1, len(idx)).round().long().numpy()
            np.testing.assert_array_equal(idx, expected, err_msg=f"{total=} {n=}")
    vp = tv_processors.video()
    for total, video_fps, fps in [(100, 25.0, 2.0), (17, 17.0, 14.0), (301, 29.97, 4.0), (9, 30.0, 2.0), (5000, 30.0, 2.0)]:
        idx, _ = processing.sample_frame_indices(total, video_fps, fps, rule="transformers")
        expected = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
        np.testing.assert_array_equal(idx, expected.numpy())


# --- resizing, normalization, patches --------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size",
    [((3, 300, 301), (252, 280)), ((2, 37, 51), (56, 84)), ((1, 480, 640), (224, 308)),
     ((1, 20, 700), (28, 980)), ((2, 57, 57), (57, 28)), ((1, 90, 30), (56, 30))],
)
def test_resize_torchvision_matches_torch_uint8_kernel(shape, size):
    frames = _uint8(*shape, 3)
    nchw = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    ref = torch.nn.functional.interpolate(nchw, size=size, mode="bicubic", align_corners=False, antialias=True)
    np.testing.assert_array_equal(processing.resize_torchvision(frames, *size), ref.permute(0, 2, 3, 1).numpy())


def test_normalize_values():
    x = np.array([[0, 128, 255]], np.uint8).T.repeat(3, axis=1)
    expected = (x / 255 - np.array(processing.OPENAI_CLIP_MEAN)) / np.array(processing.OPENAI_CLIP_STD)
    for fused in (False, True):
        out = processing.normalize(x, fused=fused)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_patchify_order_and_padding():
    t, h, w = 3, 56, 84  # odd frame count: the last frame is repeated
    tt, yy, xx, cc = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    frames = (tt * 1_000_000 + yy * 1000 + xx * 10 + cc).astype(np.float64)
    rows, grid = processing.patchify(frames)
    assert grid == (2, 4, 6) and rows.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    patch = rows.reshape(-1, 3, 2, 14, 14)  # (channel, time, row, column)
    # row 1: first 2x2 group, top-right patch; row 4: second group (columns 28..55), top-left patch
    assert patch[1, 2, 1, 3, 5] == 1 * 1_000_000 + 3 * 1000 + (14 + 5) * 10 + 2
    assert patch[4, 0, 0, 0, 0] == 28 * 10
    # row 26: grid_t 1 (frame 2 and its padded copy), first group, bottom-left patch; channel 1
    assert patch[4 * 6 + 2, 1, 0, 0, 0] == patch[4 * 6 + 2, 1, 1, 0, 0] == 2 * 1_000_000 + 14 * 1000 + 1


# --- against the transformers processors -----------------------------------------------------------

IMAGE_CASES = [
    ([(100, 137), (31, 45)], {}),  # default pixels; the small one is raised to min_pixels
    ([(223, 97)], {"min_pixels": 128 * 28 * 28}),  # min_pixels
    ([(640, 360), (1000, 1300)], {"max_pixels": 28 * 28 * 64}),  # max_pixels
]


@pytest.mark.parametrize("sizes, pixels", IMAGE_CASES)
def test_preprocess_images_equal_transformers(sizes, pixels, tv_processors):
    images = [_uint8(h, w, 3) for h, w in sizes]
    values, grid = processing.preprocess_images(images, **pixels)
    ref = Qwen2VLImageProcessor(**pixels)(images=images, return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, ref["pixel_values"])  # bit-identical
    values, grid = processing.preprocess_images(images, **pixels, resample="torchvision")
    ref = tv_processors.image_fast(**{"min_pixels": processing.IMAGE_MIN_PIXELS,
                                      "max_pixels": processing.IMAGE_MAX_PIXELS, **pixels})(images, return_tensors="pt")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"].numpy())
    np.testing.assert_array_equal(values, ref["pixel_values"].numpy())


VIDEO_CASES = [
    ((5, 100, 150), {"min_pixels": 56 * 56, "max_pixels": 50176}),  # odd count, downscaled
    ((4, 20, 30), {}),  # raised to min_pixels 128*28*28
    ((7, 333, 251), {"max_pixels": 28 * 28 * 40}),  # odd count, max_pixels
    ((1, 64, 64), {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16}),  # one frame
]


def _video_pixels(pixels: dict) -> dict:
    return {"min_pixels": processing.VIDEO_MIN_PIXELS, "max_pixels": processing.VIDEO_MAX_PIXELS, **pixels}


def test_video_pixel_defaults_are_transformers(tv_processors):
    assert (tv_processors.video.min_pixels, tv_processors.video.max_pixels) == (
        processing.VIDEO_MIN_PIXELS, processing.VIDEO_MAX_PIXELS)
    assert (Qwen2VLImageProcessor().min_pixels, Qwen2VLImageProcessor().max_pixels) == (
        processing.IMAGE_MIN_PIXELS, processing.IMAGE_MAX_PIXELS)


@pytest.mark.parametrize("shape, pixels", VIDEO_CASES)
def test_preprocess_video_equals_video_processor(shape, pixels, tv_processors):
    frames = _uint8(*shape, 3)
    values, grid, second_per_grid = processing.preprocess_video(frames, fps=4.0, **pixels)
    # explicit pixels: Qwen2VLVideoProcessor(min_pixels=...) writes into its class-level `size` dict
    ref = tv_processors.video(**_video_pixels(pixels))(videos=[frames], return_tensors="pt")
    np.testing.assert_array_equal(grid, ref["video_grid_thw"].numpy())
    np.testing.assert_array_equal(values, ref["pixel_values_videos"].numpy())  # bit-identical
    assert grid[0, 0] == (shape[0] + 1) // 2 and second_per_grid == 0.5


@pytest.mark.parametrize("shape, pixels", VIDEO_CASES[:3])
def test_preprocess_video_pil_equals_image_processor_videos(shape, pixels):
    frames = _uint8(*shape, 3)
    values, grid, _ = processing.preprocess_video(frames, fps=2.0, resample="pil", **pixels)
    ref = Qwen2VLImageProcessor(**_video_pixels(pixels))(images=None, videos=[frames], return_tensors="np")
    np.testing.assert_array_equal(grid, ref["video_grid_thw"])
    np.testing.assert_array_equal(values, ref["pixel_values_videos"])


def test_resample_paths_differ_on_noise():
    """PIL and torch's uint8 kernel are different resamplers; the choice is not cosmetic."""
    frames = _uint8(2, 300, 300, 3)
    assert (processing.resize_pil(frames, 252, 280) != processing.resize_torchvision(frames, 252, 280)).mean() > 0.01


# --- the whole Qwen2_5_VLProcessor ---------------------------------------------------------------


def _tokenizer_dir(tmp_path) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Describe the video and the picture. The cat sits on a mat."] * 5, trainer)
    tok.save(os.path.join(tmp_path, "tokenizer.json"))
    return str(tmp_path)


def test_full_processor_equals_transformers(tmp_path, tv_processors):
    path = _tokenizer_dir(tmp_path)
    hf = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(max_pixels=28 * 28 * 20),
        tokenizer=Qwen2TokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), unk_token=None,
                                     bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        video_processor=tv_processors.video(**_video_pixels({"max_pixels": 28 * 28 * 12})),
        chat_template=QWEN_TEMPLATE,
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "The cat sits."},
    ]
    images, video = [_uint8(90, 130, 3)], _uint8(5, 70, 100, 3)
    text = hf.apply_chat_template(messages, tokenize=False)
    ref = hf(text=text, images=images, videos=[video], fps=4.0, return_tensors="pt")

    pixels, image_grid = processing.preprocess_images(images, max_pixels=28 * 28 * 20)
    video_pixels, video_grid, second_per_grid = processing.preprocess_video(video, 4.0, max_pixels=28 * 28 * 12)
    ids, mask = chat.encode_chat(load_tokenizer(path), messages, image_grid, video_grid)

    np.testing.assert_array_equal(ids, ref["input_ids"][0].numpy())
    np.testing.assert_array_equal(pixels, ref["pixel_values"].numpy())
    np.testing.assert_array_equal(video_pixels, ref["pixel_values_videos"].numpy())
    np.testing.assert_array_equal(video_grid, ref["video_grid_thw"].numpy())
    assert ref["second_per_grid_ts"].tolist() == [second_per_grid]
    tok = load_tokenizer(path)
    assert (ids == tok.special_ids["<|image_pad|>"]).sum() == image_grid.prod() // 4
    assert (ids == tok.special_ids["<|video_pad|>"]).sum() == video_grid.prod() // 4
    assert tok.decode(ids[mask]) == "The cat sits.<|im_end|>"
