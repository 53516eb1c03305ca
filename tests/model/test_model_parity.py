"""Qwen2.5-VL in Flax NNX against transformers (the oracle) on tiny random models, float32."""

from __future__ import annotations

import numpy as np
import pytest

from nsa_jax import from_pretrained, get_rope_index, tiny_config

from tests.references.hf_reference import hf_logits, hf_model

TOL = 1e-4

CONFIGS = {
    "untied": dict(),
    "tied_sections_window": dict(tie_word_embeddings=True, mrope_section=(4, 2, 2), window_size=112,
                                 fullatt_block_indexes=(0, 2), vision_depth=3),
    "no_fullatt_3layers": dict(mrope_section=(2, 2, 4), fullatt_block_indexes=(), num_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(our model, HF model, config) loaded from the same HF checkpoint."""
    cfg = tiny_config(**CONFIGS[request.param])
    hf = hf_model(cfg, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return from_pretrained(str(path)), hf, cfg


def _text(rng, n):
    return list(rng.integers(0, 256, n))


def _span(cfg, token, grid):
    t, h, w = grid
    return [cfg.vision_start_token_id] + [token] * (t * h * w // 4) + [cfg.vision_end_token_id]


def _compare(ours, hf, cfg, ids, mask=None, **vision):
    pos, _ = get_rope_index(ids, cfg, attention_mask=mask, image_grid_thw=vision.get("image_grid_thw"),
                            video_grid_thw=vision.get("video_grid_thw"),
                            second_per_grid_ts=vision.get("second_per_grid_ts"))
    a = np.asarray(ours(ids, attention_mask=mask, **vision))
    b = hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=pos, **vision)
    if mask is not None:
        a, b = a[mask == 1], b[mask == 1]
    err = float(np.abs(a - b).max())
    assert err <= TOL, err
    assert np.abs(b).max() > 0.1  # the oracle's logits are not trivially small
    return err


def test_text_only(pair):
    ours, hf, cfg = pair
    rng = np.random.default_rng(1)
    _compare(ours, hf, cfg, np.array([_text(rng, 23), _text(rng, 23)]))


def test_image_odd_size(pair):
    ours, hf, cfg = pair
    rng = np.random.default_rng(2)
    grids = np.array([[1, 6, 10], [1, 4, 4]])  # patches of a 84x140 and a 56x56 image
    ids = np.array([_text(rng, 3) + _span(cfg, cfg.image_token_id, grids[0]) + _text(rng, 2)
                    + _span(cfg, cfg.image_token_id, grids[1]) + _text(rng, 4)])
    pixels = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    _compare(ours, hf, cfg, ids, pixel_values=pixels, image_grid_thw=grids)


def test_video_odd_frames(pair):
    ours, hf, cfg = pair
    rng = np.random.default_rng(3)
    grid = np.array([[3, 10, 6]])  # 6 frames (3 temporal patches), 140x84
    ids = np.array([_text(rng, 4) + _span(cfg, cfg.video_token_id, grid[0]) + _text(rng, 5)])
    pixels = rng.standard_normal((int(grid.prod()), 1176)).astype(np.float32)
    _compare(ours, hf, cfg, ids, pixel_values_videos=pixels, video_grid_thw=grid,
             second_per_grid_ts=np.array([1.5]))


def test_image_and_video(pair):
    ours, hf, cfg = pair
    rng = np.random.default_rng(4)
    ig, vg = np.array([[1, 4, 6]]), np.array([[2, 6, 4]])
    ids = np.array([_text(rng, 2) + _span(cfg, cfg.image_token_id, ig[0]) + _text(rng, 3)
                    + _span(cfg, cfg.video_token_id, vg[0]) + _text(rng, 3)])
    _compare(ours, hf, cfg, ids,
             pixel_values=rng.standard_normal((int(ig.prod()), 1176)).astype(np.float32), image_grid_thw=ig,
             pixel_values_videos=rng.standard_normal((int(vg.prod()), 1176)).astype(np.float32),
             video_grid_thw=vg, second_per_grid_ts=np.array([2.0]))


def test_padded_batch_with_video(pair):
    ours, hf, cfg = pair
    rng = np.random.default_rng(5)
    grids = np.array([[2, 4, 4], [1, 4, 8]])
    rows = [_text(rng, 3) + _span(cfg, cfg.video_token_id, grids[0]) + _text(rng, 2),
            _text(rng, 6) + _span(cfg, cfg.video_token_id, grids[1]) + _text(rng, 7)]
    n = max(map(len, rows))
    ids = np.zeros((2, n), np.int64)
    mask = np.zeros((2, n), np.int64)
    for i, r in enumerate(rows):  # left padding, as generation batches are padded
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    pixels = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    _compare(ours, hf, cfg, ids, mask=mask, pixel_values_videos=pixels, video_grid_thw=grids,
             second_per_grid_ts=np.array([0.5, 1.0]))
