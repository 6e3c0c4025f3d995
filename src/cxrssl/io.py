"""Atomic file output: write to a temporary file in the target folder, then rename.

A crash or a kill never leaves a half-written file under the final name, so Snakemake (and a
rerun) never mistakes a partial output for a complete one. A failed write (a full disk) is an
``OSError`` naming the file that could not be written and why, never a bare ``[Errno 28]``.
:func:`exclusive_lock` keeps two jobs from writing one output folder at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class OutputBusyError(RuntimeError):
    """Another job holds the lock of an output folder."""


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError of the same errno whose message names ``path``."""
    return OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` defaults to the target's suffix so libraries that infer the format from the file
    name (PIL, matplotlib, numpy) keep working.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix,
                                   dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _named(exc, path) from exc
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give outputs the usual permissions (shared HPC projects).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp, str(tmp_path)):
            raise _named(exc, path) from exc  # the temporary name would tell the user nothing
        raise


@contextlib.contextmanager
def exclusive_lock(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if needed) or refuse at once.

    A second job writing the same output (``what`` names it in the message) gets an
    :class:`OutputBusyError` naming the holder instead of interleaving its files with the first
    one's. The lock dies with the process (kill -9 included). On filesystems without ``flock``
    (some Lustre or NFS mounts) the job runs unlocked, with a warning. The lock file stays: deleting
    it would let a third job lock a new file while a second still waits on the old one.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise OutputBusyError(f"{what} is being written by another job ({holder}; lock {lock_file}): wait for "
                                  "it to finish, or give this run another output folder") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            locked = False
            log.warning("cannot lock %s (%s): nothing stops two jobs writing %s at once", lock_file, exc.strerror, what)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(obj: Any, path: str | Path, indent: int | None = 2) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def atomic_write_csv(frame, path: str | Path, index: bool = False) -> None:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file (checkpoints survive a kill mid-write).

    torch.save names the records inside its zip archive after the file it is given; the temporary
    file's random name would make two identical checkpoints differ in their bytes (and in every
    hash of them: run fingerprints, DVC). Given an open file, torch uses a fixed name instead.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def atomic_savefig(fig, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
