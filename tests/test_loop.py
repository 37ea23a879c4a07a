"""The short wait between requests (unionfs/loop.py), without a mount.

The mount tests exercise it as a whole (every daemon uses it); these pin the
two properties it must keep: readers exclude each other, and trio's other
tasks still run, even while requests keep coming.
"""

from __future__ import annotations

import os
import threading
import time

import pyfuse3
import pytest
import trio

from unionfs import loop


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def test_the_lock_excludes_and_every_waiter_gets_it():
    lock = loop.BargingLock()
    inside = 0
    most = 0
    done = 0

    async def reader() -> None:
        nonlocal inside, most, done
        for _ in range(20):
            async with lock:
                inside += 1
                most = max(most, inside)
                await trio.sleep(0)  # a handler that waits while holding it
                inside -= 1
            await trio.sleep(0)
        done += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
    assert most == 1 and done == 5 and not lock.locked()


async def test_a_free_lock_is_taken_without_a_checkpoint():
    lock = loop.BargingLock()
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(100):
            async with lock:
                pass
        assert not ran  # trio.Lock would have let it run at the first acquire
    assert ran


async def test_a_ready_descriptor_is_answered_and_other_tasks_still_run(pipe):
    r, w = pipe
    os.write(w, b"x")  # stays readable: every wait finds it ready
    waiter = loop._Waiter(poll_ms=1, yield_every=4)
    ran = False

    started = trio.Event()

    async def other() -> None:  # waits for a deadline, which only trio's loop notices
        nonlocal ran
        started.set()
        await trio.sleep(0.01)
        ran = True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await started.wait()  # it sleeps
            time.sleep(0.03)  # its deadline passes unseen
            waits = 0
            while not ran and waits < 100:
                await waiter.wait_readable(r)
                waits += 1
            # three waits straight from poll (trio never looked at its clock), then
            # every fourth through trio: the sleeper runs at the 4th or the 8th
            assert 4 <= waits <= 8, waits


async def test_a_task_ready_to_run_is_not_held_up_by_the_poll(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1000, yield_every=1000)
    ran = False

    async def handler() -> None:  # a handler past a checkpoint: what the client waits for
        nonlocal ran
        ran = True
        os.write(w, b"x")  # its reply; the next request follows

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler)
            t0 = time.monotonic()
            await waiter.wait_readable(r)
            assert ran and time.monotonic() - t0 < 0.5  # not after the 1 s poll


async def test_an_idle_wait_lets_trio_run_what_will_make_it_readable(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1, yield_every=1000)

    async def write_later() -> None:
        await trio.sleep(0.05)
        os.write(w, b"x")

    with trio.fail_after(10):  # a wait that never yielded would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            await waiter.wait_readable(r)
    assert os.read(r, 1) == b"x"


def test_install_replaces_only_the_lock_and_the_wait(monkeypatch):
    monkeypatch.setattr(pyfuse3, "trio", trio)
    assert loop.install()
    view = pyfuse3.trio
    assert view is not trio
    assert isinstance(view.Lock(), loop.BargingLock)
    assert view.lowlevel.wait_readable.__self__.__class__ is loop._Waiter
    assert view.open_nursery is trio.open_nursery
    assert view.ClosedResourceError is trio.ClosedResourceError
    assert view.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert loop.install() and pyfuse3.trio is not view  # a new mount, a new waiter
    monkeypatch.setattr(pyfuse3, "trio", None)
    assert not loop.install() and pyfuse3.trio is None  # pyfuse3 without the hook: left alone


async def test_the_run_queue_probe_counts_what_trio_would_run():
    probe = loop.runnable_probe()
    assert probe is not loop._runnable_by_statistics, "trio's run loop changed: slower fallback"
    token = trio.lowlevel.current_trio_token()
    counts = [probe()]  # nothing else to run

    async def task() -> None:
        pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        counts.append(probe())  # a new task waits in the run queue
        token.run_sync_soon(lambda: None)
        counts.append(probe())  # and a callback from "another thread"
        assert probe() == loop._runnable_by_statistics()
    assert counts == [0, 1, 2]


async def test_a_reader_woken_by_the_lock_does_not_divert_the_wait(pipe):
    r, w = pipe
    os.write(w, b"x")
    waiter = loop._Waiter(poll_ms=1000, yield_every=1000)
    lock = waiter.lock()
    other_in = trio.Event()

    async def other_reader() -> None:
        other_in.set()
        async with lock:
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(other_reader)
                await other_in.wait()
                await trio.sleep(0)  # the other reader parks on the held lock
            # released: the other reader is woken, but retaking the lock beats it
            async with lock:
                assert waiter.woken == [1]
                await waiter.wait_readable(r)  # polled: trio did not run it
                assert waiter.woken == [1]
    assert waiter.woken == [0]  # it ran, took the lock once free, and left


async def test_a_handler_woken_in_the_same_batch_is_not_held_up_by_the_poll(pipe):
    """trio runs a batch of woken tasks in a random order, off its run queue: the
    handler the client waits for may be due right after the reader that polls."""
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1000, yield_every=1000)

    async def handler(go: trio.Event) -> None:
        await go.wait()
        os.write(w, b"x")  # its reply; the next request follows

    async def reader(go: trio.Event) -> None:
        await go.wait()
        await waiter.wait_readable(r)
        assert os.read(r, 1) == b"x"

    for _ in range(12):  # each order of the two comes up with probability 1/2
        go = trio.Event()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handler, go)
                nursery.start_soon(reader, go)
                await trio.sleep(0.01)  # both wait on the event
                t0 = time.monotonic()
                go.set()  # both scheduled in one batch
        assert time.monotonic() - t0 < 0.5  # not after the 1 s poll


async def test_a_burst_is_waited_for_busily_and_a_pause_ends_the_spinning(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1, yield_every=1000, spin_us=50)
    assert not waiter.spinning  # nothing came yet: sleep first
    os.write(w, b"x")
    await waiter.wait_readable(r)  # a request at once: part of a burst
    assert waiter.spinning
    await waiter.wait_readable(r)  # still readable: the spin finds it
    assert waiter.spinning
    os.read(r, 1)

    async def write_later(task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0.05)
        os.write(w, b"x")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(write_later)
            await trio.sleep(0)  # it sleeps: nothing for trio to run
            await waiter.wait_readable(r)  # the spin, then the 1 ms poll, find nothing
    assert not waiter.spinning  # a pause: the next wait sleeps at once
    assert os.read(r, 1) == b"x"


async def test_spin_us_0_never_spins(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1, yield_every=1000, spin_us=0)
    os.write(w, b"x")
    for _ in range(3):
        await waiter.wait_readable(r)
        assert not waiter.spinning


def test_install_passes_the_spin_on(monkeypatch):
    monkeypatch.setattr(pyfuse3, "trio", trio)
    assert loop.install(spin_us=7)
    assert pyfuse3.trio.lowlevel.wait_readable.__self__.spin_s == 7e-6


async def test_a_thread_result_ends_the_blocking_poll(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=1000, yield_every=1000, spin_us=0)
    in_thread = threading.Event()

    def work() -> None:  # a big copy-up's data, say
        in_thread.set()
        time.sleep(0.05)

    async def handler(task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.to_thread.run_sync(work)
        os.write(w, b"x")  # its reply; the next request follows

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(handler)
            while not in_thread.is_set():  # until the handler waits for its thread
                await trio.sleep(0.001)
            t0 = time.monotonic()
            await waiter.wait_readable(r)
            assert time.monotonic() - t0 < 0.5  # woken by trio's socket, not the 1 s poll
    assert os.read(r, 1) == b"x"


async def test_a_closed_writer_ends_the_wait_at_once():
    r, w = os.pipe()
    os.close(w)
    waiter = loop._Waiter(poll_ms=1000, yield_every=1000)
    try:
        with trio.fail_after(5):
            await waiter.wait_readable(r)  # POLLHUP: the reader then sees the end
        assert os.read(r, 1) == b""
    finally:
        os.close(r)


async def test_the_lock_survives_a_cancelled_waiter_and_a_failing_holder():
    woken = [0]
    lock = loop.BargingLock(woken)
    cancelled = False

    async def impatient(task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal cancelled
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with lock:
                pass
        cancelled = scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        async with lock:
            scope = await nursery.start(impatient)
            await trio.sleep(0)  # it parks on the held lock
            scope.cancel()
            await trio.sleep(0.01)
        assert cancelled and woken == [0] and not lock.locked()
    with pytest.raises(ValueError):
        async with lock:
            raise ValueError("a failing handler")
    assert not lock.locked() and woken == [0]
    async with lock:
        assert lock.locked()


async def test_a_long_idle_wait_ends_at_trios_next_deadline(pipe):
    r, w = pipe
    waiter = loop._Waiter(poll_ms=60_000, yield_every=1000, spin_us=0)

    async def write_later() -> None:  # a sleep: only trio's clock knows when it ends
        await trio.sleep(0.05)
        os.write(w, b"x")

    with trio.fail_after(10):  # a wait past the deadline would take the full minute
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            await trio.sleep(0)  # it sleeps: nothing for trio to run
            t0 = time.monotonic()
            await waiter.wait_readable(r)
            assert time.monotonic() - t0 < 5
    assert os.read(r, 1) == b"x"


async def test_a_descriptor_another_task_waits_for_ends_the_wait(pipe):
    """A task parked in trio on another descriptor (a supervisor's pipe, inotify):
    when that descriptor fires, the wait lets trio run the task at once."""
    r, w = pipe
    r2, w2 = os.pipe()
    waiter = loop._Waiter(poll_ms=60_000, yield_every=1000, spin_us=0)

    async def watcher(task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.lowlevel.wait_readable(r2)
        os.write(w, b"x")  # what its event leads to

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher)
                await trio.sleep(0)  # it parks in trio's epoll
                threading.Timer(0.05, os.write, (w2, b"y")).start()
                t0 = time.monotonic()
                await waiter.wait_readable(r)
                assert time.monotonic() - t0 < 5
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r2)
        os.close(w2)


async def test_a_request_after_a_pause_is_read_straight_from_the_poll(pipe, monkeypatch):
    """A client that pauses (a new process, an interpreter computing) longer than
    any busy wait: its request still skips trio's round trip."""
    r, w = pipe
    waiter = loop._Waiter(spin_us=0)  # the defaults, as a mount has them
    through_trio = 0
    trio_wait = trio.lowlevel.wait_readable

    async def counted(fd: object) -> None:
        nonlocal through_trio
        through_trio += 1
        await trio_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)
    with trio.fail_after(10):
        for pause in (0.005, 0.02, 0.1):
            threading.Timer(pause, os.write, (w, b"x")).start()
            await waiter.wait_readable(r)
            assert os.read(r, 1) == b"x"
    assert through_trio == 0
