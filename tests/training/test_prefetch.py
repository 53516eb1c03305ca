"""Prefetched: same batches and states as its source, errors re-raised in order, end of data."""

from __future__ import annotations

import numpy as np
import pytest

from nsa_jax.training.prefetch import Prefetched


class Counter:
    """A stateful source: batch i is [i, i], state {"next": i + 1}; fails at `fail_at`, ends at `stop`."""

    def __init__(self, start: int = 0, stop: int = 10**9, fail_at: int = -1):
        self.i, self.stop, self.fail_at = start, stop, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"corrupt batch {self.i}")
        if self.i >= self.stop:
            raise StopIteration
        self.i += 1
        return np.full(2, self.i - 1)

    def get_state(self):
        return {"next": self.i}


def test_batches_and_state_of_the_last_batch_taken():
    p = Prefetched(Counter(start=5), depth=3)
    assert p.get_state() == {"next": 5}
    for i in range(5, 12):
        np.testing.assert_array_equal(next(p), [i, i])
        # The thread is ahead, yet the state is the one that resumes right after batch i.
        assert p.get_state() == {"next": i + 1}


def test_error_raised_at_its_batch_and_end_of_data():
    p = Prefetched(Counter(fail_at=2))
    assert [int(next(p)[0]) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="corrupt batch 2"):
        next(p)
    with pytest.raises(ValueError, match="corrupt batch 2"):
        next(p)
    assert [int(b[0]) for b in Prefetched(Counter(stop=3))] == [0, 1, 2]
