"""The wait between two FUSE requests, made short.

pyfuse3 reads requests in trio tasks: each reader takes a ``trio.Lock``, then
parks in ``trio.lowlevel.wait_readable`` on the FUSE descriptor.  So between
two requests a daemon goes twice through trio's scheduler (the lock's
checkpoint, then the park, the ``epoll_wait`` and the reschedule): about
15 us of Python on the critical path of every request.  A client that calls
the file system in a tight loop (``ls -l``, ``tar``, ``git status``, a
compiler) waits for all of it: a ``getxattr`` round trip took 29-34 us against
fuse-overlayfs' 14-18 us (docs/performance.md).

pyfuse3 looks the trio API up through its module attribute ``pyfuse3.trio``
(the hook its own asyncio mode uses).  ``install`` puts there a view of trio
that differs in two names, leaving pyfuse3's logic (reader tasks, their
count, its termination) as it is:

- ``Lock`` is a lock without fairness or checkpoint: the reader that just
  released it may take it back at once instead of handing it over through
  the scheduler.  Mutual exclusion between readers is all pyfuse3 needs it
  for; other readers (started while a handler waits, e.g. on a big copy-up)
  still park on it and get it when it is free.
- ``lowlevel.wait_readable`` first waits for the descriptor in a blocking
  ``poll`` of at most ``POLL_MS``: a client in a loop sends its next request
  within microseconds, and it is read without trio's round trip.  It waits
  through trio instead when trio has a task ready to run (a handler past a
  checkpoint, whose client is waiting for it), when nothing came in time,
  and on every ``YIELD_EVERY``-th wait whatever happens, so trio's other
  tasks (signals, worker thread results) run at least that often.
"""

from __future__ import annotations

import select
from typing import Any

import pyfuse3
import trio

#: Longest blocking wait outside trio (ms): the most other tasks wait for it.
POLL_MS = 1
#: One wait in this many goes through trio's scheduler even under load.
YIELD_EVERY = 32


class BargingLock:
    """Mutual exclusion for pyfuse3's reader tasks, with no checkpoint.

    ``trio.Lock`` checkpoints on every acquire and hands the lock to the
    longest waiter on release, so the reader that releases it must park
    and come back through the scheduler.  Here a free lock is simply taken,
    and a released one wakes one waiter, which retries.
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()

    def locked(self) -> bool:
        return self._held


class _Waiter:
    """``wait_readable`` that polls before it parks in trio."""

    def __init__(self, poll_ms: int = POLL_MS, yield_every: int = YIELD_EVERY) -> None:
        self.poll_ms = poll_ms
        self.yield_every = yield_every
        self.waits = 0
        self._pollers: dict[int, select.poll] = {}

    async def wait_readable(self, fd: Any) -> None:
        self.waits += 1
        if self.waits % self.yield_every and not _others_ready():
            fileno = fd if isinstance(fd, int) else fd.fileno()
            poller = self._pollers.get(fileno)
            if poller is None:
                poller = self._pollers[fileno] = select.poll()
                poller.register(fileno, select.POLLIN)
            if poller.poll(self.poll_ms):
                return  # readable, or closed: pyfuse3's read then says which
        await trio.lowlevel.wait_readable(fd)


def _others_ready() -> bool:
    """Has trio something to run now (a handler past a checkpoint, a thread's result)?

    Blocking in poll then would hold that up until the next request or the
    timeout, and a handler that checkpoints (every trio lock does) is often
    the one the client is waiting for.
    """
    stats = trio.lowlevel.current_statistics()
    return bool(stats.tasks_runnable or stats.run_sync_soon_queue_size)


class _View:
    """A module's attributes, with some replaced."""

    def __init__(self, base: Any, **replaced: Any) -> None:
        self._base = base
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def trio_view(waiter: _Waiter | None = None) -> Any:
    """trio as pyfuse3 should see it (see the module docstring)."""
    waiter = waiter or _Waiter()
    lowlevel = _View(trio.lowlevel, wait_readable=waiter.wait_readable)
    return _View(trio, Lock=BargingLock, lowlevel=lowlevel)


def install() -> bool:
    """Make pyfuse3 use the short wait; False if this pyfuse3 has no such hook."""
    if getattr(pyfuse3, "trio", None) is not trio:
        return False
    pyfuse3.trio = trio_view()  # type: ignore[attr-defined]
    return True
