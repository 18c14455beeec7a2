"""A background thread that writes a tracker's completed records, off the training thread.

On a GPU the training loop is bound by the host: every millisecond the tracker spends assembling and
writing a record lengthens the step. Backward releases the GIL while autograd runs in C++, so the host
work on values that have already arrived (`sink.RecordSink.write`) can run then, on this thread. The
device-side part of a logging step (its statistics kernels, its non-blocking copies) stays on the
training thread.

`WriterThread` is a bounded queue, one worker, and an error slot:

- items are written one at a time, in the order they were put;
- `put` waits while `bound` items are queued, so a writer that falls behind costs the training thread
  time, never unbounded memory (writing on the training thread instead would break the order);
- an exception raised by a write is kept and re-raised on the training thread by `raise_error`, the
  original exception object, so ``except OSError`` works as without the thread (its traceback holds
  the writer thread's frames, as ``concurrent.futures.Future.result`` re-raises); later items are
  still written, and a second error before the first is collected is logged, not dropped silently;
- the thread is a daemon: an interpreter exiting with a tracker never closed does not wait for it.
  `stop` (called by ``Tracker.close``, or by a ``weakref.finalize`` when the tracker is collected)
  lets it write what is queued and end; it never blocks, so it is safe to run from a finalizer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from gradkit.tracking.alerts import logger

__all__ = ["BOUND", "WriterThread"]

#: queued records at most; a full queue makes the training thread wait for the writer
BOUND = 64


class WriterThread:
    """One daemon thread that calls ``write(item)`` for each item put, in order, with a bounded queue.

    Args:
        write: called on the thread with each item; it must not refer to the owner (a tracker), so that
            the owner can be collected while the thread lives.
        bound: the most items queued (a positive int; default `BOUND`); `put` waits beyond it.
        name: the thread's name.

    Raises:
        ValueError: `bound` is not a positive int.

    Memory: at most `bound` items held.

    Example:
        >>> writer = WriterThread(sink_write)
        >>> writer.put(item)           # returns at once unless `bound` items wait
        >>> writer.wait_idle()         # every item put so far is written
        >>> writer.raise_error()       # re-raises what a write raised, if anything
        >>> writer.stop(); writer.join()
    """

    def __init__(
        self, write: Callable[[Any], None], *, bound: int | None = None, name: str = "gradkit-tracking"
    ) -> None:
        bound = BOUND if bound is None else bound
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise ValueError(f"bound must be a positive int, got {bound!r}; pass e.g. bound=64")
        self.bound = bound
        self._write = write
        self._items: deque[Any] = deque()
        self._busy = False  # an item is being written (taken off the queue, not yet done)
        self._error: BaseException | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        """Queue `item` for writing; waits while `bound` items are queued already.

        Raises:
            RuntimeError: the writer was stopped.
        """
        with self._cond:
            if self._stopped:
                raise RuntimeError("the tracking writer thread was stopped; records can no longer be queued to it")
            while len(self._items) >= self.bound:
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def pending(self) -> int:
        """Items queued or being written."""
        with self._cond:
            return len(self._items) + self._busy

    def wait_idle(self) -> None:
        """Wait until every item put so far has been written (or has failed)."""
        with self._cond:
            while self._items or self._busy:
                self._cond.wait()

    def raise_error(self) -> None:
        """Re-raise (once) the exception a write raised, if any."""
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        """Let the thread write what is queued, then end; returns at once (see the module docstring)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self) -> None:
        """Wait for the stopped thread to end."""
        self._thread.join()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._items and not self._stopped:
                    cond.wait()
                if not self._items:  # stopped, and nothing left to write
                    break
                item = self._items.popleft()
                self._busy = True
                cond.notify_all()  # room in the queue
            try:
                self._write(item)
            except BaseException as error:  # handed to the training thread, not swallowed
                self._keep(error)
            finally:
                item = None  # a written record is not kept alive while the thread waits for the next one
                with cond:
                    self._busy = False
                    cond.notify_all()
        if self._error is not None:  # no one will collect it: the tracker was stopped or collected
            logger.error("the tracking writer thread failed", exc_info=self._error)

    def _keep(self, error: BaseException) -> None:
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note("(raised on the tracker's writer thread, while writing a record)")
        with self._cond:
            if self._error is None:
                self._error = error
                return
        logger.error("the tracking writer thread failed again before the last error was raised", exc_info=error)
