"""In-process fan-out of ``ChangeEvent``s to ``Store.subscribe`` callbacks.

Backends hand each committed change to ``ChangeFeed.publish`` (a cheap,
non-blocking call that is safe from synchronous driver callbacks); one
dispatcher task per store then calls the subscribers in publication order.
A slow subscriber therefore never delays the write that produced the event,
and an exception in one subscriber is logged, not propagated to the writer or
to the other subscribers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable

from .base import ChangeCallback
from .models import ChangeEvent

log = logging.getLogger(__name__)


class ChangeFeed:
    """Subscriber list plus an ordered dispatcher task bound to the running loop."""

    def __init__(self) -> None:
        self._callbacks: list[ChangeCallback] = []
        self._queue: asyncio.Queue[ChangeEvent] | None = None
        self._task: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def add(self, callback: ChangeCallback) -> None:
        if not callable(callback):
            raise TypeError(f"subscriber must be callable, got {callback!r}")
        if callback not in self._callbacks:
            self._callbacks.append(callback)
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._dispatch(self._queue), name="store-change-feed")

    def remove(self, callback: ChangeCallback) -> bool:
        """Forget ``callback``; True if it was subscribed."""
        try:
            self._callbacks.remove(callback)
        except ValueError:
            return False
        return True

    def publish(self, event: ChangeEvent) -> None:
        """Queue ``event`` for every current subscriber (no-op without subscribers)."""
        if self._callbacks and self._queue is not None:
            self._queue.put_nowait(event)

    async def close(self) -> None:
        """Drop every subscriber and stop the dispatcher; queued events are discarded."""
        self._callbacks.clear()
        task, self._task, self._queue = self._task, None, None
        await cancel_and_wait(task)

    async def _dispatch(self, queue: asyncio.Queue[ChangeEvent]) -> None:
        while True:
            event = await queue.get()
            for callback in list(self._callbacks):
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("store change subscriber %r failed on %r", callback, event)


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task of the feed (a dispatcher, a listener) and wait until it has ended."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def threadsafe_publisher(loop: asyncio.AbstractEventLoop, feed: ChangeFeed) -> Callable[[ChangeEvent], None]:
    """A ``publish`` callable for a worker thread: it hops onto ``loop`` first."""

    def publish(event: ChangeEvent) -> None:
        try:
            loop.call_soon_threadsafe(feed.publish, event)
        except RuntimeError:  # the loop is closed: nobody is left to notify
            pass

    return publish
