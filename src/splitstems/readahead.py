"""Read-ahead: iterate something slow (decoding, training batches) in a background thread.

One implementation for everything that reads ahead: the separator's decoder
(:mod:`splitstems.separator`), the evaluation's track loader and training's batches
(:mod:`splitstems.train.trainer`). It owns the stop rules:

- the producer never blocks for good: every hand-over waits only while nobody asked it
  to stop, so a consumer that stops early (an error, Ctrl-C, ``break``) is never left
  waiting for the thread, and no thread is left holding items;
- the producer closes its source (``close()`` of a generator: files, decoders) in its own
  thread, whether it ran to the end, failed or was stopped;
- the consumer's generator, when closed (explicitly, or by ``finally`` in its caller),
  stops the producer, drops what was read ahead and waits for the thread to end.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch", "JOIN_TIMEOUT"]

log = logging.getLogger(__name__)

T_co = TypeVar("T_co")

#: How long closing the read-ahead waits for its thread: the thread ends as soon as the
#: source returns its current item (one decoded chunk, one batch), normally milliseconds.
#: A source stuck for longer (a hung network read) is left to end on its own.
JOIN_TIMEOUT = 30.0
#: How often a waiting hand-over looks at the stop flag, in seconds.
_POLL = 0.05

_ITEM, _END, _ERROR = "item", "end", "error"


def prefetch(items: Iterable[T_co], *, depth: int = 2) -> Iterator[T_co]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead.

    Decoding the next chunk then overlaps the model's compute on this one (the codecs
    release the GIL). Exceptions of the source are re-raised in the consumer. Closing
    the returned generator (``close()``, or leaving a ``for`` loop by an exception and
    closing it in ``finally``) stops the producer promptly and closes the source. The
    thread starts with the first item asked for.
    """
    buffer: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def hand_over(kind: str, value: object) -> bool:
        """Put one message unless asked to stop first; return whether it was put."""
        message = (kind, value)
        while not stop.is_set():
            try:
                buffer.put(message, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not hand_over(_ITEM, item):
                    return
            hand_over(_END, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            hand_over(_ERROR, exc)
        finally:
            _close(source)

    thread = threading.Thread(target=produce, name="splitstems-readahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        _drain(buffer)  # let go of what was read ahead now
        thread.join(timeout=JOIN_TIMEOUT)
        _drain(buffer)
        if thread.is_alive():
            log.warning("read-ahead thread still busy %.0f s after it was stopped", JOIN_TIMEOUT)


def _drain(buffer: queue.Queue[tuple[str, object]]) -> None:
    while True:
        try:
            buffer.get_nowait()
        except queue.Empty:
            return


def _close(source: Iterator[object]) -> None:
    """Close a generator-like source; its error on closing is logged, not raised."""
    close = getattr(source, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # noqa: BLE001 - the thread's result is already decided
        log.warning("closing the read-ahead's source failed", exc_info=True)
