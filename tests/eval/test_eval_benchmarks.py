"""Each benchmark in its own shipped format (tiny fixtures written here) through `launch.eval --task=...`, and the
videonsa_eval preset's frame indices and sizes against torch / qwen-vl-utils' arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.synthetic import write_mp4

from tests import ROOT


def _video(path, frames=8, size=(56, 84)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(0)
    write_mp4(str(path), rng.integers(0, 255, (frames, *size, 3), dtype=np.uint8), fps=4)


def _parquet(path, rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _fixture(task: str, d) -> None:
    if task == "longvideobench_val_v":
        _video(d / "videos" / "a.mp4")
        rows = [{"id": f"lvb{i}", "video_path": "a.mp4", "question": "What?", "option0": "x", "option1": "y",
                 "option2": "z", "option3": "N/A", "option4": "N/A", "correct_choice": i % 3,
                 "duration_group": 15, "question_category": "S2E"} for i in range(2)]
        _parquet(d / "validation-00000-of-00001.parquet", rows)
    elif task == "mlvu_test":
        _video(d / "video" / "m.mp4")
        rows = [{"question_id": "m0", "video_name": "video/m.mp4", "question": "Q?\n(A) x\n(B) y", "answer": "A",
                 "task_type": "count"}, {"question_id": "m1", "video_name": "video/missing.mp4",
                                         "question": "Q?\n(A) x\n(B) y", "answer": "B", "task_type": "ego"}]
        _parquet(d / "test-00000-of-00001.parquet", rows)
    elif task in ("timescope", "longtimescope"):
        _video(d / "clips" / "t.MP4")  # found through the .mp4 -> .MP4 fallback
        rows = [{"id": "t0", "video": "clips/t.mp4", "input": "Q?\nA. x\nB. y\nAnswer with the letter.",
                 "answer": "A", "type": "QA", "length": 60}]
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif task == "tomato":
        _video(d / "videos" / "human" / "o.mp4")
        rows = [{"id": "o0", "question": "Which way?", "options": ["left", "right"], "answer": 1,
                 "video_path": "videos/human/o.mp4", "reason_type": "direction", "demonstration_type": "human"}]
        _parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    elif task == "vsibench":
        _video(d / "arkitscenes" / "s1.mp4")
        rows = [{"id": 1, "dataset": "arkitscenes", "scene_name": "s1", "question_type": "object_counting",
                 "question": "How many chairs?", "options": None, "ground_truth": "3"},
                {"id": 2, "dataset": "arkitscenes", "scene_name": "s1", "question_type": "route_planning",
                 "question": "Which way?", "options": ["A. left", "B. right"], "ground_truth": "A"}]
        _parquet(d / "test-00000-of-00001.parquet", rows)


TASKS = ["longvideobench_val_v", "mlvu_test", "timescope", "longtimescope", "tomato", "vsibench"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nsa_jax import init_model, save_hf, tiny_config

    path = tmp_path_factory.mktemp("model")
    save_hf(init_model(tiny_config(), seed=0), str(path))
    return path


@pytest.mark.parametrize("task", TASKS)
def test_benchmark_end_to_end(task, model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _fixture(task, data)
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "launch.eval", f"--model={model_dir}", f"--task={task}", f"--data_dir={data}",
           f"--out={out}", "--max_frames=4", "--max_pixels=3136", "--min_pixels=3136", "--max_new_tokens=3"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["task"] == task and results["preset"]["name"] == "videonsa_eval"
    assert results["preset"]["fps"] == (1.0 if task == "vsibench" else 4.0)
    assert "overall" in run.stdout and (tmp_path / "results.table.txt").exists()
    answered = [r for r in results["records"] if "failed" not in r]
    assert all(isinstance(r["prediction"], str) for r in answered)
    if task == "mlvu_test":  # the missing video is recorded, not fatal
        assert results["failed"] == 1 and results["failures"][0]["id"] == "m1"
    else:
        assert results["failed"] == 0 and answered


@pytest.mark.parametrize("total, video_fps", [(100, 25.0), (7000, 30.0), (45000, 29.97), (123457, 59.94),
                                              (20000, 24.0), (3001, 23.976)])
def test_eval_frame_indices_equal_torch(total, video_fps):
    torch = pytest.importorskip("torch")
    from nsa_jax.processing import PRESETS, frame_indices

    preset = PRESETS["videonsa_eval"]
    idx, _ = frame_indices(total, video_fps, preset)
    # lmms-eval's smart_nframes: fps 4, min 4 frames, max 500, floored to even; then torch's float32 linspace
    n = min(max(total / video_fps * 4, 4), 500, total) // 2 * 2
    expected = torch.linspace(0, total - 1, int(n)).round().long().numpy()
    np.testing.assert_array_equal(idx, expected)


@pytest.mark.parametrize("height, width, frames", [(360, 640, 500), (1080, 1920, 500), (640, 360, 100),
                                                   (224, 224, 8), (120, 160, 500), (480, 854, 4)])
def test_eval_sizes_follow_lmms_eval_and_the_processor(height, width, frames):
    # the fork's smart_resize is transformers' (each rounded side at least 28, moot at these sizes); PyPI's
    # qwen-vl-utils 0.0.14 refuses max_pixels < min_pixels, which the fork's copy accepts, so it is no oracle here
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from nsa_jax.processing import PRESETS, fetch_size, processor_video

    preset = PRESETS["videonsa_eval"]
    h, w = fetch_size(height, width, frames, preset)
    bound = max(min(768 * 28 * 28, int(128000 * 28 * 28 * 0.9) / frames * 2), int(preset.min_pixels * 1.05))
    assert (h, w) == smart_resize(height, width, factor=28, min_pixels=preset.min_pixels,
                                  max_pixels=min(preset.max_pixels, bound))
    ph, pw = smart_resize(h, w, factor=28, min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)
    _, grid, _ = processor_video(np.zeros((2, h, w, 3), np.uint8), preset)
    assert grid.tolist() == [[1, ph // 14, pw // 14]]


def test_spec_measured_processor_grid():
    # SPEC §7: frames resized to 168x280 come out as a 26x42 patch grid with min 200704 / max 50176
    from nsa_jax.processing import PRESETS, processor_video

    frames = np.zeros((2, 168, 280, 3), np.uint8)
    rows, grid, spg = processor_video(frames, PRESETS["videonsa_eval"])
    assert grid.tolist() == [[1, 26, 42]] and rows.shape == (26 * 42, 1176) and spg == 1.0
