"""How a shardnet command stops: on a stop signal, while an Executor loads, and at an exit something holds.

A command must stop in order on SIGTERM, SIGHUP or Ctrl-C (a Deployment it started stops its processes and
removes its folders), a worker still loading its Executor must end at once on a signal or its launcher's exit
(a container's PID 1 would never receive SIGTERM otherwise), and a thread an Executor left running must not
hold the exit for ever. Argument parsing stays in ``options.py``; serving's own stop (a drain) is
``runtimes/lifecycle.py``, whose parent watch, session ending and immediate exit these use.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Coroutine, Optional, TypeVar

from shardnet.runtimes.lifecycle import end_own_session, exit_now, wait_for_parent_exit
from shardnet.runtimes.log_lines import THREADS_STEP
from shardnet.runtimes.worker import CLOSE_THREAD_NAME, HANDLER_THREAD_PREFIX, THREAD_EXIT_GRACE

logger = logging.getLogger(__name__)
T = TypeVar("T")

# the exit code of a head or worker whose drain's grace ended with requests still under way (cut unanswered), or of
# a worker with handler calls still running on their threads then (left behind): a supervisor sees that work it took
# was lost
DRAIN_CUT_EXIT = 4
# what stops a command in order (run_stoppable, on_stop_signals): a supervisor, a closed terminal, Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class StoppedBySignal(KeyboardInterrupt):
    """What ``run_stoppable`` raises once a stop signal has stopped its coroutine in order; ``code`` is the exit
    code a shell reports for a process that signal ended, 128 + its number (SIGTERM 143, SIGHUP 129, Ctrl-C 130):
    a supervisor sees a stop, not a failure or a clean exit. A KeyboardInterrupt, as Ctrl-C's own stop is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, which SIGTERM, SIGHUP (a closed terminal) and Ctrl-C, each unless ignored (as a
    background job's SIGINT is), stop in order: the first cancels ``main`` where it awaits, its ``async with``
    blocks exit (a Deployment stops every process and removes its folders), then ``StoppedBySignal`` is raised.
    A later one changes nothing: the stop under way is bounded. One that comes as ``main`` ends, too late to
    cancel it, is not lost: the handler there before gets it once ``main``'s result is in (deploy's sets the
    event its serving loop looks at), or, with none of the program's own (the default action, Python's
    KeyboardInterrupt), ``StoppedBySignal`` is raised as if it had cancelled ``main``.

    The handler only hands the stop to the event loop: a KeyboardInterrupt raised wherever the signal lands
    may land in a gRPC callback, where gRPC swallows it, and the program then waited for ever."""
    received: list[int] = []
    result = asyncio.run(_cancelled_on_stop_signals(main, received))
    if received:
        raise StoppedBySignal(received[0])
    return result  # type: ignore[return-value]  # None only with a signal received


async def _cancelled_on_stop_signals(main: Coroutine[Any, Any, T], received: list[int]) -> Optional[T]:
    """``main``, cancelled by the first stop signal, whose number goes in ``received``; None then."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    heard: list[int] = []  # every stop signal the handler below took, one too late to cancel main too

    def stop(signum: int) -> None:  # in the event loop, between its callbacks
        if not received and not task.done():
            received.append(signum)
            task.cancel()

    def on_signal(signum: int, frame: Any) -> None:  # wherever the main thread is: it only tells the loop
        heard.append(signum)
        loop.call_soon_threadsafe(stop, signum)

    # Python-level handlers, swapped without a moment under the default action (loop.add_signal_handler's
    # removal restores SIG_DFL): what was there before (deploy's next handler) takes over at once after
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        return None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if heard and not received:  # it came as main ended: the loop never got to cancel it
            _pass_on(heard[0], previous[heard[0]], received)


def _pass_on(signum: int, handler: Any, received: list[int]) -> None:
    """Give the stop signal ``signum``, which came too late to cancel ``run_stoppable``'s coroutine, to
    ``handler``, the one there before, when the program installed it; else put it in ``received``, for
    ``StoppedBySignal``."""
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
    else:
        received.append(signum)


def on_stop_signals(handler: Callable[[int, Any], Any]) -> None:
    """Make SIGTERM, SIGHUP (a closed terminal) and SIGINT run ``handler``, each unless ignored, as from the start
    under nohup (SIGHUP) or in a background job of a script (SIGINT): what runs it so asked that the signal not
    stop it.

    Their default action ends the process at once, so a Deployment started would neither stop its processes nor
    remove its folders. ``deploy`` passes a handler setting the event its serving loop looks at, to stop at its
    next look rather than mid-restart.
    """
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def end_loading_on_stop_signals(parent_pid: Optional[int] = None) -> threading.Event:
    """Make SIGTERM (and SIGHUP, unless ignored from the start as under nohup) end the process at once while
    what runs before serving, an Executor's load, runs, as their default action would; serving installs its
    own handlers (a drain) after. With ``parent_pid`` (``--parent-pid``), that process's exit ends it too,
    within half a second: a Deployment killed while a model loaded left its worker loading on, however long.
    Set the event returned once serving takes over (it watches the parent itself from then on).

    A container's PID 1 with no handler of its own never receives SIGTERM: a pod deleted while its model loaded
    sat out its whole grace period, then was killed. An exit rather than an exception: a load interrupted has
    no Executor to close, and a thread its ``__init__`` started would hold an orderly exit for ever.
    """
    ending = threading.Event()  # the watch below said why already: a signal it sends ends the process quietly

    def end_now(signum: int, frame: Any) -> None:
        _end_loading(None if ending.is_set() else signal.Signals(signum).name, 128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, end_now)
    serving = threading.Event()
    if parent_pid is not None and parent_pid > 0:  # an invalid one is refused with its reason once serving starts
        direct = os.getppid() == parent_pid
        watch = threading.Thread(
            target=_end_loading_when_parent_goes, args=(parent_pid, direct, serving, ending),
            name="shardnet-parent-watch", daemon=True,
        )
        watch.start()
    return serving


def _end_loading_when_parent_goes(
    parent_pid: int, direct: bool, serving: threading.Event, ending: threading.Event
) -> None:
    """End the process once ``parent_pid`` has gone, unless ``serving`` is set first (serving watches it then)."""
    if not wait_for_parent_exit(parent_pid, direct, serving):
        return
    ending.set()
    logger.warning("its launcher (--parent-pid %d) exited while loading the Executor: stopped", parent_pid)
    # what the load started goes too, as at a served process's end: SIGTERM to its session (this process
    # included, whose handler above exits), when it leads one
    end_own_session()
    _end_loading(None, 128 + signal.SIGTERM)


def _end_loading(signal_name: Optional[str], code: int) -> None:
    """Exit at once with ``code``, first saying the load was stopped by ``signal_name`` (None: said already)."""
    if signal_name is not None:
        logger.warning("%s while loading the Executor: stopped", signal_name)
    exit_now(code)


def exit_leaving_stuck_handlers(code: int, stuck: int, close_left: bool = False) -> int:
    """Return ``code``; or, when ``stuck`` handler calls still run past the drain's grace (their calls cut and
    the Executor closed already), or the Executor's ``close()`` was left running past its bound (``close_left``),
    exit with it at once: Python joins non-daemon threads at exit, so a handler or a close() that hangs would
    hold the process past --drain-seconds. The process's other threads get ``THREAD_EXIT_GRACE`` seconds to end
    and its atexit functions run first, as at a normal exit; only those stuck threads are left behind."""
    threads = [thread for thread in threading.enumerate() if thread is not threading.main_thread()
               and not thread.daemon and not thread.name.startswith(HANDLER_THREAD_PREFIX)
               and not (close_left and thread.name == CLOSE_THREAD_NAME)]
    if threads:  # what a launcher's kill from here on cuts short, as it reads the log
        logger.info("%s (%gs at most): %s", THREADS_STEP, THREAD_EXIT_GRACE, ", ".join(t.name for t in threads))
    if not stuck and not close_left:
        return code
    if stuck:
        logger.warning("exiting with %d handler call(s) still running past the drain's grace", stuck)
    deadline = time.monotonic() + THREAD_EXIT_GRACE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    atexit._run_exitfuncs()  # what the interpreter's exit would run, which os._exit skips
    exit_now(code)


def watch_the_exit(code: int) -> None:
    """For a program about to exit with ``code``: if a non-daemon thread (one an Executor started and never
    ended) still holds the exit ``THREAD_EXIT_GRACE`` seconds from now, name it and exit without it. Python
    joins such threads before anything else at exit: a worker hung after its drain, for ever, until a
    Deployment's stop killed it. Once the atexit functions have begun (an index saved at exit, say), the
    exit is under way and the watch stands down: they run once, and to their end."""
    exiting = threading.Event()
    atexit.register(exiting.set)  # registered last: the first to run

    def watch() -> None:
        if exiting.wait(THREAD_EXIT_GRACE):
            return
        held_by = [thread.name for thread in threading.enumerate()
                   if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]
        logger.warning(
            "exiting with %d thread(s) still running %gs after the program ended: %s (an Executor's? make them "
            "daemon threads, or end them in its close())", len(held_by), THREAD_EXIT_GRACE, ", ".join(held_by),
        )
        exit_now(code)

    threading.Thread(target=watch, name="shardnet-exit-watch", daemon=True).start()
