"""Atomic file writes: write to a temporary sibling, then rename over the target.

Nothing half-written is ever visible under the final name, so an interrupted job
leaves either the previous file or no file, never a truncated one. The final file gets the
mode an ordinary ``open(..., "w")`` would give it (``0o666 & ~umask``), not the private 0600 of
``tempfile.mkstemp``, so colleagues on a shared server can read the results.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: restore at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a newly created regular file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success.

    The temporary file lives in the same directory (same filesystem) so the rename
    is atomic. On an exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else final.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f"{sfx}.tmp", dir=final.parent)
    except PermissionError as e:  # name the file the user asked for, not the hidden temporary one
        raise PermissionError(
            f"cannot write {final}: permission denied in {final.parent} ({e.strerror}); "
            "choose a writable output folder"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, file_mode())  # mkstemp creates 0600; give the umask's mode
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(final: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically and return the final path."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(final)


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically and return the final path."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)
