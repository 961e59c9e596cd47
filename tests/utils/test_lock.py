"""One run per output folder: refuse naming the holder, wait, take over stale locks."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gigaslide.utils.lock import LOCK_NAME, OutputLock, OutputLockedError, output_lock, read_holder


def test_second_run_refuses_naming_the_holder(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out", command="gigaslide embed tiles --out out"):
        holder = read_holder(tmp_path / "out" / LOCK_NAME)
        assert holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()
        with pytest.raises(OutputLockedError) as e, output_lock(tmp_path / "out", command="second"):
            pass
        msg = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder.started}" in msg
        assert "gigaslide embed tiles --out out" in msg and "--wait" in msg
    # released: the lock file is gone and the folder can be taken again
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    with output_lock(tmp_path / "out", command="third"):
        pass


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    code = (
        "import sys, time; from gigaslide.utils.lock import output_lock\n"
        "with output_lock(sys.argv[1], command='holder'):\n"
        "    print('locked', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} on .*: holder"):
            OutputLock(tmp_path, "me").acquire()
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed: the kernel dropped its flock; its stale file is taken over
    assert read_holder(tmp_path / LOCK_NAME).pid == proc.pid  # type: ignore[union-attr]
    with OutputLock(tmp_path, "me"):
        assert read_holder(tmp_path / LOCK_NAME).pid == os.getpid()  # type: ignore[union-attr]


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path: Path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x", "command": "old run"})
    )
    with caplog.at_level(logging.INFO, logger="gigaslide.utils.lock"), output_lock(tmp_path, command="new"):
        assert read_holder(tmp_path / LOCK_NAME).command == "new"  # type: ignore[union-attr]
    assert "took over the stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    first = OutputLock(tmp_path, "first").acquire()
    threading.Timer(0.3, first.release).start()
    t0 = time.monotonic()
    with output_lock(tmp_path, command="second", wait=True, poll_s=0.05):
        waited = time.monotonic() - t0
        assert read_holder(tmp_path / LOCK_NAME).command == "second"  # type: ignore[union-attr]
    assert waited >= 0.25
    with OutputLock(tmp_path, "third"), pytest.raises(OutputLockedError, match="gave up after waiting"):
        OutputLock(tmp_path, "fourth", wait=True, poll_s=0.01, timeout_s=0.05).acquire()


def test_lock_file_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with OutputLock(tmp_path, "x"):
            mode = stat.S_IMODE((tmp_path / LOCK_NAME).stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644
