"""mRoPE position ids: hand-worked examples, and transformers 4.57's get_rope_index as an oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nsa_jax import get_rope_index, tiny_config

from tests.references.hf_reference import hf_model

CFG = tiny_config()


def _video_example():
    c = CFG
    # 2 text, vision start, a (t=2, h=4, w=4) video = 2 x 2 x 2 merged tokens, vision end, 1 text.
    return np.array([[7, 8, c.vision_start_token_id] + [c.video_token_id] * 8 + [c.vision_end_token_id, 9]])


@pytest.mark.parametrize("mode,spg,expected_t,after", [
    # int(0.5) = 0: every frame pair gets the span's start id (VideoNSA's training rule).
    ("truncate", 0.5, [3] * 8, 5),
    # exact rule: floor(t * 0.5 * 2) = t.
    ("exact", 0.5, [3] * 4 + [4] * 4, 5),
    # int(2.0) * 2 tokens per second = 4 ids per temporal patch.
    ("truncate", 2.0, [3] * 4 + [7] * 4, 8),
])
def test_video_ids_hand_worked(mode, spg, expected_t, after):
    cfg = CFG.replace(video_time_ids=mode)
    pos, delta = get_rope_index(_video_example(), cfg, video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[spg])
    p = pos[:, 0]
    np.testing.assert_array_equal(p[:, :3], [[0, 1, 2]] * 3)
    np.testing.assert_array_equal(p[0, 3:11], expected_t)
    np.testing.assert_array_equal(p[1, 3:11], [3, 3, 4, 4] * 2)
    np.testing.assert_array_equal(p[2, 3:11], [3, 4, 3, 4] * 2)
    np.testing.assert_array_equal(p[:, 11:], [[after, after + 1]] * 3)
    assert delta[0] == after + 2 - 13


def test_text_only_is_arange():
    pos, delta = get_rope_index(np.array([[1, 2, 3, 4]]), CFG)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(4), (3, 1, 4)))
    assert delta[0] == 0


def test_matches_transformers_457_on_padded_mixed_batch():
    c = CFG
    rng = np.random.default_rng(0)
    img, vid = [c.vision_start_token_id] + [c.image_token_id] * 6 + [c.vision_end_token_id], \
        [c.vision_start_token_id] + [c.video_token_id] * 12 + [c.vision_end_token_id]
    rows = [list(rng.integers(0, 256, 3)) + img + [5, 6] + vid + [9],
            list(rng.integers(0, 256, 2)) + vid + [4] + img + [3, 2, 1, 0]]
    n = max(map(len, rows))
    ids = np.zeros((2, n), np.int64)
    mask = np.zeros((2, n), np.int64)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    image_grid = np.array([[1, 4, 6], [1, 6, 4]])
    video_grid = np.array([[3, 4, 4], [3, 4, 4]])
    spg = np.array([2.5, 1.0])
    ours, our_delta = get_rope_index(ids, c, image_grid_thw=image_grid, video_grid_thw=video_grid,
                                     second_per_grid_ts=spg, attention_mask=mask)
    model = hf_model(c).model
    theirs, their_delta = model.get_rope_index(torch.tensor(ids), torch.tensor(image_grid), torch.tensor(video_grid),
                                               torch.tensor(spg), torch.tensor(mask))
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(our_delta, their_delta.numpy().reshape(-1))


def test_span_without_enough_pad_tokens_is_an_error():
    c = CFG
    ids = np.array([[c.vision_start_token_id] + [c.video_token_id] * 3 + [c.vision_end_token_id]])
    with pytest.raises(ValueError, match="needs 8 pad tokens"):
        get_rope_index(ids, c, video_grid_thw=[[2, 4, 4]])
