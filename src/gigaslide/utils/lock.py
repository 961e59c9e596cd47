"""One run per output folder: an advisory lock file ``OUT/.gigaslide.lock``.

Two batch jobs writing into one folder would discard each other's partial files and leave a
manifest that contradicts the files. :func:`output_lock` takes an exclusive ``flock`` on the lock
file for the life of the job and writes the holder (pid, host, start time, command) into it. A
second run refuses with a message naming the holder, or waits for it (``wait=True``). The kernel
drops the lock when its process dies, so the lock of a killed run is taken over by the next one
(logged). Where the filesystem offers no ``flock``, the holder's pid is checked instead (same host).

Under torchrun only global rank 0 takes the lock; the outcome is shared with every rank so that
all of them refuse together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gigaslide.utils.atomic import file_mode
from gigaslide.utils.dist import DistInfo
from gigaslide.utils.errors import UserError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: pid check only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".gigaslide.lock"


class OutputLockedError(UserError):
    """Another live run holds the output folder."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock file."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"

    def alive(self) -> bool:
        """Whether the holder process still runs; unknown (another host) counts as alive."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True


def read_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in a lock file, or None when the file is absent, empty or unreadable."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return LockHolder(int(doc["pid"]), str(doc["host"]), str(doc["started"]), str(doc["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _me(command: str) -> LockHolder:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return LockHolder(os.getpid(), socket.gethostname(), started, command)


class OutputLock:
    """An exclusive lock on one output folder (see module docstring).

    Args:
        folder: the output folder (created if needed).
        command: what holds the lock, shown to a refused second run (e.g. ``"gigaslide embed ..."``).
        wait: wait for the holder to finish instead of refusing.
        poll_s: seconds between attempts while waiting.
        timeout_s: give up waiting after this many seconds (None: wait for ever).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        command: str,
        wait: bool = False,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.wait = wait
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._fd: int | None = None

    def _refusal(self, holder: LockHolder | None) -> OutputLockedError:
        who = holder.describe() if holder else "another gigaslide run (holder unknown)"
        return OutputLockedError(
            f"output folder {self.folder} is in use by {who}. Wait for it to finish, pass --wait to "
            f"queue behind it, or choose another --out (lock file {self.path})"
        )

    def _try_once(self) -> bool:
        """One attempt; True when this process now holds the lock, False when a live run holds it."""
        for _ in range(100):  # a finishing holder may unlink the file between our open and flock
            held = self._try_open_and_lock()
            if held is not None:
                return held
        return False

    def _try_open_and_lock(self) -> bool | None:
        """True: locked; False: held by a live run; None: the file was replaced meanwhile, retry."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        return False
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    holder = read_holder(self.path)  # no flock here: trust the recorded pid
                    if holder is not None and holder.pid != os.getpid() and holder.alive():
                        os.close(fd)
                        return False
            # the file may have been unlinked by a finishing holder between open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._fd = fd
        return True

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        announced = False
        while not self._try_once():
            holder = read_holder(self.path)
            if not self.wait:
                raise self._refusal(holder)
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise OutputLockedError(
                    f"gave up after waiting {self.timeout_s:g} s for {self.folder}: "
                    + str(self._refusal(holder))
                )
            if not announced:
                who = holder.describe() if holder else "another run"
                log.info("waiting for %s to release %s", who, self.folder)
                announced = True
            time.sleep(self.poll_s)
        previous = read_holder(self.path)
        if previous is not None and previous.pid != os.getpid():
            log.info("took over the stale lock of a run that no longer holds it (%s)", previous.describe())
        assert self._fd is not None
        data = json.dumps(_me(self.command).__dict__).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # unlink while holding: a waiter re-checks the inode it locked
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike[str],
    command: str | None = None,
    wait: bool = False,
    dist_info: DistInfo | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> Iterator[None]:
    """Hold the lock of ``folder`` for the ``with`` block (rank 0 only under torchrun; see module doc).

    Raises:
        OutputLockedError: another live run holds the folder (and ``wait`` is False, or timed out).
    """
    command = command or " ".join(["gigaslide", *sys.argv[1:]])[:300]
    info = dist_info or DistInfo()
    lock = OutputLock(folder, command, wait=wait, poll_s=poll_s, timeout_s=timeout_s)
    error: str | None = None
    if info.is_main:
        try:
            lock.acquire()
        except OutputLockedError as e:
            error = str(e)
        except OSError as e:  # e.g. a read-only folder: every rank must hear of it, not wait
            if not info.is_distributed:
                raise
            error = f"cannot lock {folder}: {e}"
    if info.is_distributed:
        error = _share_from_rank0(error)
    if error is not None:
        raise OutputLockedError(error)
    try:
        yield
    finally:
        lock.release()


def _share_from_rank0(message: str | None) -> str | None:
    """Rank 0's lock outcome on every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]
