"""Host batches prepared ahead of the training step by a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

_END = object()


class Prefetched(Iterator[Any]):
    """Yields `source`'s batches, preparing up to `depth` of them ahead on a daemon thread.

    `get_state()` is the source's state just after the last batch taken from here (not after the batches
    prepared ahead), so a checkpoint resumes exactly where training stopped. Set the source's state before
    wrapping it. An error raised by the source is raised by the `next` that would have returned its batch.
    """

    def __init__(self, source: Any, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._state = source.get_state()
        threading.Thread(target=self._fill, args=(source,), daemon=True, name="prefetch").start()

    def _fill(self, source: Any) -> None:
        try:
            for batch in source:
                self._queue.put((batch, source.get_state()))
            self._queue.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(e)

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> Any:
        return self._state
