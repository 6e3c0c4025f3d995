"""Per-file work in worker processes that may crash, be killed or hang, without stalling the stage.

``multiprocessing.Pool`` loses the task of a worker that dies (a decoder that segfaults, the
out-of-memory killer's SIGKILL) and then waits for its result forever. :func:`run_tasks` keeps
its own workers instead: each has a pipe and at most two queued tasks, so the parent always knows
which task a worker was running. When a worker dies, that task is retried in a fresh worker
(``retries`` times: an OOM kill can be bad luck with busy siblings), then reported as
:class:`TaskFailed` with the signal named; a task running longer than ``timeout_s`` is killed and
reported the same way (a hang would only hang again, so it is not retried). The other tasks carry
on in a replacement worker. With ``workers=0`` tasks run in this process (no isolation: for
debugging only).

Workers start through the forkserver (no threads of the parent inherited), import ``preload``
once in the server, and exit when their pipe closes, so a killed parent leaves no orphans.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)

#: Tasks sent ahead to one worker (the first runs, the next waits): hides the pipe latency.
QUEUE_DEPTH = 2
#: Workers killed by a signal while starting (the OOM killer does not wait) are replaced this many
#: times; a worker that exits by itself while starting (an import error) stops the run at once.
MAX_STARTUP_DEATHS = 8
#: Exceptions that mean "stop everything", never "this task failed".
FATAL = (KeyboardInterrupt, SystemExit)


@dataclass(frozen=True)
class TaskFailed:
    """A task whose worker died or timed out; ``reason`` says how (for a quarantine entry)."""

    reason: str


class WorkerError(RuntimeError):
    """A task function raised instead of returning (a bug or an environment error, not bad input)."""


def _worker_main(conn, func: Callable, initializer: Callable | None) -> None:
    if initializer is not None:
        initializer()
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        index, task = message
        try:
            outcome = ("ok", func(task))
        except FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
            outcome = ("raised", f"{type(exc).__name__}: {exc}")
        conn.send((index, outcome))


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``"was killed by SIGKILL (e.g. the out-of-memory killer)"``; ``1`` -> ``"exited with status 1"``."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (e.g. the out-of-memory killer)", "SIGSEGV": " (a crash in native code)",
                "SIGABRT": " (an abort in native code)", "SIGBUS": " (a crash in native code)"}.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


@dataclass
class _Slot:
    process: Any
    conn: Any
    queue: deque = field(default_factory=deque)  # (index, task); the head is running
    since: float = 0.0  # when the head task started
    ready: bool = False  # the worker has started (a worker that cannot start is not a bad task)


def run_tasks(func: Callable[[Any], Any], tasks: Iterable[Any], workers: int, *,
              initializer: Callable[[], None] | None = None, preload: tuple[str, ...] = (),
              retries: int = 1, timeout_s: float | None = None, what: str = "task") -> Iterator[tuple[int, Any]]:
    """Yield ``(task index, func(task) or TaskFailed)`` as tasks complete (in any order).

    ``func``, ``initializer`` and the tasks must be picklable (module-level functions, plain
    data). ``func`` should return, not raise: a raised exception stops the run as
    :class:`WorkerError`. Closing the generator early kills the workers at once.
    """
    tasks = list(tasks)
    if workers <= 0:
        if initializer is not None:
            initializer()
        for index, task in enumerate(tasks):
            yield index, func(task)
        return
    if not tasks:
        return
    context = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if context.get_start_method() == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))  # no effect once the server runs: harmless
    pending: deque = deque(enumerate(tasks))
    attempts: dict[int, int] = {}
    slots: list[_Slot] = []
    startup_deaths = 0

    def start() -> _Slot:
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, func, initializer), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def feed(slot: _Slot) -> None:
        while pending and len(slot.queue) < QUEUE_DEPTH:
            item = pending.popleft()
            try:
                slot.conn.send(item)
            except OSError:  # the worker died: the wait below sees its sentinel
                pending.appendleft(item)
                return
            if not slot.queue:
                slot.since = time.monotonic()
            slot.queue.append(item)

    def retire(slot: _Slot) -> None:
        slot.conn.close()
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        slots.remove(slot)

    def lost(slot: _Slot, reason: str, retry: bool) -> Iterator[tuple[int, Any]]:
        """The slot's worker is gone: fail or requeue its running task, requeue the rest."""
        retire(slot)
        if not slot.queue:
            return
        index, task = slot.queue.popleft()
        for item in reversed(slot.queue):  # waiting tasks go back first in line, unpenalised
            pending.appendleft(item)
        attempts[index] = attempts.get(index, 0) + 1
        if retry and attempts[index] <= retries:
            log.warning("worker %s while on %s %d; retrying it in a fresh worker", reason, what, index)
            pending.appendleft((index, task))
        else:
            tries = f" ({attempts[index]} attempts)" if attempts[index] > 1 else ""
            yield index, TaskFailed(f"the worker process {reason} while processing it{tries}")

    try:
        while pending or any(s.queue for s in slots):
            while pending and len(slots) < min(workers, len(tasks)):
                slots.append(start())
            for slot in slots:
                feed(slot)
            timeout = None
            if timeout_s is not None:
                busy = [s.since for s in slots if s.queue]
                timeout = max(0.0, min(busy) + timeout_s - time.monotonic()) if busy else None
            ready = set(wait([s.conn for s in slots] + [s.process.sentinel for s in slots], timeout=timeout))
            for slot in list(slots):
                dead = False
                try:
                    while slot.conn.poll():
                        message = slot.conn.recv()
                        if message == "ready":
                            slot.ready = True
                            continue
                        index, outcome = message
                        slot.queue.popleft()
                        slot.since = time.monotonic()
                        if outcome[0] == "raised":
                            raise WorkerError(f"{what} {index} raised in its worker: {outcome[1]}")
                        yield index, outcome[1]
                except (EOFError, OSError, pickle.UnpicklingError):
                    dead = True
                if dead or slot.process.sentinel in ready or not slot.process.is_alive():
                    slot.process.join(timeout=5)
                    code = slot.process.exitcode
                    if not slot.ready:  # died while starting: its tasks never ran
                        startup_deaths += 1
                        if code is None or code >= 0 or startup_deaths > MAX_STARTUP_DEATHS:
                            raise WorkerError(f"a worker process could not start ({describe_exit(code)}); "
                                              "see the messages above")
                        retire(slot)
                        pending.extendleft(reversed(slot.queue))
                        continue
                    yield from lost(slot, describe_exit(code), retry=True)
                elif timeout_s is not None and slot.queue and time.monotonic() - slot.since > timeout_s:
                    yield from lost(slot, f"was stopped after {timeout_s:g} s without a result", retry=False)
    finally:
        for slot in slots:
            try:
                if slot.process.is_alive() and not slot.queue:
                    slot.conn.send(None)
            except OSError:
                pass
        for slot in slots:
            slot.process.join(timeout=0 if slot.queue else 5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
