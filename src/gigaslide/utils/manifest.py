"""Per-slide job manifest: a CSV recording status, counts, timing and errors.

Batch jobs (tiling, embedding) keep one row per slide. The file is rewritten
atomically after every update, so a killed job leaves a consistent manifest and a
rerun can skip the slides already ``done`` and retry the ``failed`` ones.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gigaslide.utils.atomic import atomic_write_text

STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"


class Manifest:
    """A keyed table of per-slide results persisted as CSV.

    Args:
        path: CSV file; loaded if it exists.
        key: name of the column identifying a row (``slide_id``).
        columns: preferred column order; extra columns seen in updates are appended.
    """

    def __init__(
        self, path: str | os.PathLike[str], key: str = "slide_id", columns: Iterable[str] = ()
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.columns: list[str] = [key, *[c for c in columns if c != key]]
        self.rows: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for name in reader.fieldnames or []:
                    if name not in self.columns:
                        self.columns.append(name)
                for row in reader:
                    self.rows[row[key]] = dict(row)

    def status(self, key: str) -> str | None:
        """Return the recorded status of ``key`` or None when it has no row."""
        row = self.rows.get(key)
        return row.get("status") if row else None

    def is_done(self, key: str) -> bool:
        return self.status(key) == STATUS_DONE

    def update(self, key: str, values: Mapping[str, Any]) -> None:
        """Insert or update the row of ``key`` and persist the manifest atomically."""
        with self._lock:
            row = self.rows.setdefault(key, {self.key: key})
            for name, value in values.items():
                if name not in self.columns:
                    self.columns.append(name)
                row[name] = "" if value is None else str(value)
            self._flush()

    def _flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow({c: row.get(c, "") for c in self.columns})
        atomic_write_text(self.path, buf.getvalue())

    def failed(self) -> dict[str, str]:
        """Map of failed keys to their recorded error message."""
        return {k: r.get("error", "") for k, r in self.rows.items() if r.get("status") == STATUS_FAILED}

    def __len__(self) -> int:
        return len(self.rows)
