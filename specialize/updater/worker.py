"""The ``async`` mode's background thread: a bounded queue of observations and one worker.

The worker trains each queued observation in turn. When training raises, the error is kept,
logged and warned about, and every later observation is drained and counted instead of
trained (the shadow heads are suspect); serving goes on with the last published heads.

The thread never dies before :meth:`TrainingWorker.close`: an error while reporting an error
(a logging handler or a warnings filter that raises) is kept in ``report_error`` and the
loop goes on, and :meth:`~TrainingWorker.flush` and :meth:`~TrainingWorker.close` return even
if the thread is gone, so neither can hang.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable

from specialize.updater.observation import Observation

__all__ = ["TrainingWorker"]

_LOG = logging.getLogger(__name__)
_STOP = object()  # queue sentinel that ends the background thread
_POLL_SECONDS = 0.1  # how often flush() and close() check that the thread still runs


class TrainingWorker:
    """A daemon thread named ``HeadUpdater`` that runs ``train`` on submitted observations.

    Closed at interpreter exit if still running (queued work is finished first).

    Args:
        train: Trains one observation (``HeadUpdater._train``).
        queue_size: Observations that may wait; :meth:`submit` refuses more.

    Attributes:
        error: The exception that stopped training, or ``None``.
        report_error: An exception raised while reporting ``error`` (logged, warned), or
            ``None``.
        dropped: Samples drained untrained after the error (written by the worker only).
    """

    def __init__(self, train: Callable[[Observation], None], queue_size: int) -> None:
        self.error: BaseException | None = None
        self.report_error: BaseException | None = None
        self.dropped = 0
        self._train = train
        self._closed = False
        self._queue: queue.Queue[Observation | object] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="HeadUpdater", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            worker = ref()
            if worker is not None:
                worker.close()

        self._atexit_hook = close_at_exit
        atexit.register(close_at_exit)

    def submit(self, observation: Observation) -> bool:
        """Queue ``observation`` without blocking; ``False`` when full or after an error."""
        if self.error is not None:
            return False
        try:
            self._queue.put_nowait(observation)
        except queue.Full:
            return False
        return True

    def flush(self) -> None:
        """Wait until every queued observation has been handled (returns if the thread died)."""
        pending = self._queue.all_tasks_done
        with pending:
            while self._queue.unfinished_tasks and self._thread.is_alive():
                pending.wait(timeout=_POLL_SECONDS)

    def close(self) -> None:
        """Finish queued work and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=_POLL_SECONDS)
                break
            except queue.Full:  # the thread is busy with a full queue: wait, or see it died
                continue
        self._thread.join()
        atexit.unregister(self._atexit_hook)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._handle(item)
            except BaseException as err:  # noqa: BLE001 - the loop must outlive any error
                self._fail(err)
            finally:
                self._queue.task_done()

    def _handle(self, item: Observation) -> None:
        if self.error is None:
            self._train(item)
        else:  # after a failure the shadow state is suspect: drain only
            self.dropped += item.num_samples

    def _fail(self, err: BaseException) -> None:
        """Keep the first error (later items are drained), then report it."""
        if self.error is None:
            self.error = err
        try:
            self._report(err)
        except BaseException as report_err:  # noqa: BLE001 - e.g. warnings filtered as errors
            self.report_error = report_err

    def _report(self, err: BaseException) -> None:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        _LOG.error("HeadUpdater background thread failed; serving continues with the last "
                   "published heads", exc_info=err)
        warnings.warn(
            "HeadUpdater background thread failed; serving continues with the last published "
            f"heads and further observations are dropped (see updater.error):\n{text}",
            RuntimeWarning, stacklevel=2,
        )
