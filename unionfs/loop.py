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
- ``lowlevel.wait_readable`` first waits for the descriptor in ``poll``:
  during a burst of requests busy for up to ``SPIN_US`` (no sleep to wake
  from), then blocking: a client in a loop sends its next request within
  microseconds, and it is read without trio's round trip, nor the wake-up of
  a sleeping daemon.  The blocking wait is the one trio itself would make:
  it also wakes for whatever trio waits for (its epoll descriptor: other
  tasks' descriptors, worker threads' results, signals) and ends at trio's
  next deadline (a task's sleep or timeout), at most ``POLL_MS``.  So a
  client that pauses between requests (an interpreter, a program that
  computes, a new process starting) finds the daemon asleep right on the
  descriptor, not in trio's loop, which costs every such request its round
  trip.  It waits through trio instead when trio has a task ready to run (a
  handler past a checkpoint, whose client is waiting for it; not a reader
  woken by the lock, which would only park again), when trio's own wait
  would have ended (one of its events, its deadline), and on every
  ``YIELD_EVERY``-th wait whatever happens, so trio's other tasks run at
  least that often.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

#: Longest blocking wait outside trio (ms).  It wakes for all that trio waits
#: for and ends at trio's next deadline (``_Waiter``), so this only bounds what
#: a trio without those internals could miss: then the wait is ``FALLBACK_MS``.
POLL_MS = 1000
#: The blocking wait where trio's deadlines and epoll descriptor are unknown.
FALLBACK_MS = 1
#: The C helper's blocking wait for the next request of a burst (ms): it ends
#: the burst when nothing came (unionfs/_dispatch.c); this waiter takes over.
BURST_WAIT_MS = 1
#: One wait in this many goes through trio's scheduler even under load.
YIELD_EVERY = 32
#: Longest busy wait for the next request before sleeping (us; ``-o spin_us=``).
SPIN_US = 30


class BargingLock:
    """Mutual exclusion for pyfuse3's reader tasks, with no checkpoint.

    ``trio.Lock`` checkpoints on every acquire and hands the lock to the
    longest waiter on release, so the reader that releases it must park
    and come back through the scheduler.  Here a free lock is simply taken,
    and a released one wakes one waiter, which retries.

    ``woken`` counts the waiters woken that have not run yet: while the lock
    is held again they will only park again, so they are no reason to leave
    the short wait (``_Waiter``).  It is shared by the locks of one waiter.
    """

    def __init__(self, woken: list[int] | None = None) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self._woken = woken if woken is not None else [0]

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
            self._woken[0] -= 1
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()
            self._woken[0] += 1

    def locked(self) -> bool:
        return self._held


class _Waiter:
    """``wait_readable`` that polls (busy, then blocking) before it parks in trio."""

    def __init__(
        self,
        poll_ms: int = POLL_MS,
        yield_every: int = YIELD_EVERY,
        spin_us: int = SPIN_US,
        spun_out: Callable[[], bool] | None = None,
    ) -> None:
        self.poll_ms = poll_ms
        #: True once if the C helper's last burst spun for the next request in
        #: vain (unionfs/_dispatch.c): spinning again here would only double it.
        self.spun_out = spun_out
        self.yield_every = yield_every
        self.spin_s = spin_us / 1e6
        #: A sleep that a request ends sooner than this is part of a burst (the
        #: wake-up itself takes 10-40 us here): spin again after it.
        self.rearm_s = 2 * self.spin_s
        #: Busy-wait before the next sleep: requests are coming in a burst.
        self.spinning = False
        self.waits = 0
        #: Reader-lock waiters woken and not yet run (see ``BargingLock``).
        self.woken = [0]
        self._pollers: dict[int, select.poll] = {}
        self._runnable: Callable[[], int] | None = None
        #: How long the blocking wait may last now (ms; ``_poller`` sets it).
        self._timeout: Callable[[], float] = lambda: min(self.poll_ms, FALLBACK_MS)

    def lock(self) -> BargingLock:
        """A reader lock whose woken waiters this waiter knows to ignore."""
        return BargingLock(self.woken)

    async def wait_readable(self, fd: Any) -> None:
        self.waits += 1
        if self.waits % self.yield_every and not self.others_ready():
            fileno = fd if type(fd) is int else fd.fileno()
            poller = self._pollers.get(fileno) or self._poller(fileno)
            spin = self.spinning and not (self.spun_out is not None and self.spun_out())
            events = self._spin(poller) if spin else None
            if not events:
                start = time.perf_counter()
                events = poller.poll(self._timeout())
                if events:
                    elapsed = time.perf_counter() - start
                    self.spinning = self.spin_s > 0 and elapsed < self.rearm_s
            # Only the FUSE descriptor (each polled descriptor is reported once):
            # readable, or closed: pyfuse3's read then says which.
            if len(events) == 1 and events[0][0] == fileno:
                return
        await trio.lowlevel.wait_readable(fd)

    def _poller(self, fileno: int) -> select.poll:
        """A poll set of ``fileno`` and what trio's own wait would wake for.

        trio's worker threads (a big copy-up's data) and signal handlers
        report through its wake-up socket, other tasks wait for their
        descriptors (a supervisor's pipe, inotify) in its epoll descriptor:
        when one fires, the wait goes through trio, which runs what it
        reported, instead of sleeping on.  Where trio's epoll descriptor or
        deadlines cannot be read, the wait lasts ``FALLBACK_MS`` at most.
        """
        poller = self._pollers.get(fileno)
        if poller is None:
            poller = self._pollers[fileno] = select.poll()
            poller.register(fileno, select.POLLIN)
            wakeup = trio_wakeup_fd()
            if wakeup is not None:
                poller.register(wakeup, select.POLLIN)
            sleep = trio_sleep_view()
            if sleep is not None:
                epoll_fd, until_deadline = sleep
                poller.register(epoll_fd, select.POLLIN)
                cap = self.poll_ms
                self._timeout = lambda: min(until_deadline(), cap)
        return poller

    def _spin(self, poller: select.poll) -> list[tuple[int, int]]:
        """Busy-wait up to ``spin_s`` for an event; stop spinning if none comes.

        Waking a daemon asleep in ``poll`` costs the client more than most
        requests do (a reschedule; on a VM an interrupt through the
        hypervisor): a ``getxattr`` round trip from a C client took 55-62 us
        with the sleep, 17.5-18.6 us with this wait, fuse-overlayfs' 52-64 us
        (interleaved, docs/performance.md).  A client in a loop sends its next
        request within microseconds; one that does not costs ``spin_s`` of CPU
        once, and the next spin waits for a request that comes fast again.
        """
        end = time.perf_counter() + self.spin_s
        while not (events := poller.poll(0)):
            if time.perf_counter() >= end:
                self.spinning = False
                break
        return events

    def others_ready(self) -> bool:
        """Has trio something to run now (a handler past a checkpoint, a thread's result)?

        Blocking in poll then would hold that up until the next request or the
        timeout, and a handler that checkpoints (every trio lock does) is often
        the one the client is waiting for.  Reader-lock waiters woken by the
        caller's last release do not count: the caller holds the lock again.
        """
        if self._runnable is None:
            self._runnable = runnable_probe()
        return self._runnable() > self.woken[0]


def runnable_probe() -> Callable[[], int]:
    """A function counting what trio would run now: scheduled tasks and queued callbacks.

    The public count (``trio.lowlevel.current_statistics()``) builds two
    objects and reads the clock: asked before every request it was an eighth
    of the daemon's Python time while creating files.  It also misses tasks
    scheduled in the batch trio is running now (taken off the run queue as a
    whole): a handler woken in the same batch as the reader that polls waited
    out the poll (copy-ups, whose per-node lock is a checkpoint, lost 1 ms
    each in one request in eight).  A task is scheduled exactly while its
    ``_next_send_fn`` is set (trio's own invariant, ``Task``), which also
    covers that batch.  If this trio has no such attributes, the public count
    is used.  Call inside ``trio.run``.
    """
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        tasks, entries = runner.tasks, runner.entry_queue
        me = trio.lowlevel.current_task()
        if me not in tasks or me._next_send_fn is not None:
            raise AttributeError("not trio's scheduling invariant")
        len(entries.queue), len(entries.idempotent_queue)
    except (AttributeError, TypeError):
        return _runnable_by_statistics

    def runnable() -> int:
        n = len(entries.queue) + len(entries.idempotent_queue)
        for task in tasks:
            if task._next_send_fn is not None:
                n += 1
        return n

    return runnable


def trio_wakeup_fd() -> int | None:
    """The socket trio's threads and signal handlers write to, if this trio has one."""
    try:
        sock = trio._core._run.GLOBAL_RUN_CONTEXT.runner.entry_queue.wakeup.wakeup_sock
        return int(sock.fileno())
    except (AttributeError, TypeError, OSError):
        return None


def trio_sleep_view() -> tuple[int, Callable[[], float]] | None:
    """trio's epoll descriptor, and a function of the ms until its next deadline.

    Together they are what trio's run loop sleeps on when it has nothing to
    run (``epoll_wait`` on that descriptor until the next deadline), so a wait
    on both misses nothing trio would have woken for.  None if this trio has
    no such internals.  Call inside ``trio.run``.
    """
    try:
        runner = trio._core._run.GLOBAL_RUN_CONTEXT.runner
        epoll_fd = int(runner.io_manager._epoll.fileno())
        deadlines, clock = runner.deadlines, runner.clock
        deadlines.next_deadline(), clock.deadline_to_sleep_time(math.inf)
    except (AttributeError, TypeError, ValueError, OSError):
        return None

    def until_deadline() -> float:
        seconds = clock.deadline_to_sleep_time(deadlines.next_deadline())
        return max(0.0, math.ceil(seconds * 1000.0)) if seconds < math.inf else math.inf

    return epoll_fd, until_deadline


def _runnable_by_statistics() -> int:
    stats = trio.lowlevel.current_statistics()
    return stats.tasks_runnable + stats.run_sync_soon_queue_size


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
    return _View(trio, Lock=waiter.lock, lowlevel=lowlevel)


def install(spin_us: int = SPIN_US, spun_out: Callable[[], bool] | None = None) -> _Waiter | None:
    """Make pyfuse3 use the short wait: the waiter, or None if this pyfuse3 has no such hook.

    Each call puts a fresh waiter in place (one per mount: what it caches
    belongs to one ``trio.run``).  ``spun_out``: see ``_Waiter``.
    """
    if getattr(pyfuse3, "trio", None) is not trio and not isinstance(pyfuse3.trio, _View):
        return None
    waiter = _Waiter(spin_us=spin_us, spun_out=spun_out)
    pyfuse3.trio = trio_view(waiter)  # type: ignore[attr-defined]
    return waiter
