"""Helpers for the worker-pool and lock tests; the task functions are importable by workers (forkserver)."""

import os
import signal
import time


def work(task):
    """``("ok", n)`` -> 2n; ``"kill"``/``"segv"`` kill the worker; ``"sleep"`` hangs; ``"raise"`` raises."""
    kind, n = task
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "sleep":
        time.sleep(n)
    if kind == "raise":
        raise ValueError("boom")
    return 2 * n


def cannot_start():
    os._exit(3)


def pool_workers():
    """The live worker processes of this process's forkserver (forked from it: same command line)."""
    import psutil

    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return [c for s in servers for c in s.children() if c.status() != psutil.STATUS_ZOMBIE]


def blocked_on_fifo(process) -> bool:
    """True while ``process`` waits in open(2) for a FIFO's writer (Linux: /proc/<pid>/wchan)."""
    try:
        with open(f"/proc/{process.pid}/wchan") as fh:
            return fh.read().strip() == "wait_for_partner"
    except OSError:
        return False


def hold_lock(lock_file):
    """A second process that holds ``cxrssl.io.exclusive_lock(lock_file)`` until its stdin closes."""
    import subprocess
    import sys

    code = ("import sys; from cxrssl.io import exclusive_lock\n"
            f"with exclusive_lock({str(lock_file)!r}, 'x'):\n    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
