"""The one reader of label tables, shared by `gigaslide train` (:class:`~gigaslide.data.cohort.Cohort`)
and `gigaslide probe`.

Columns: ``slide_id``, ``case_id`` (the patient: no case is ever split across training and test)
and either a class column (``label`` by default) or ``time`` + ``event`` (survival; ``event`` 1 =
death/progression observed, 0 = censored). Every problem raises :class:`LabelsError` naming the
file, the offending slide ids (the first 20 and the count) and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

TASKS = ("classification", "survival")


class LabelsError(ValueError):
    """Invalid label table; the message names the file, the offending ids and the fix."""


def format_ids(ids: Iterable[object], limit: int = 20) -> str:
    """``'[N] a, b, c'`` for the first ``limit`` ids plus ``'(+M more, N in total)'`` when truncated."""
    ids = [str(i) for i in ids]
    head = ", ".join(ids[:limit])
    if len(ids) > limit:
        head += f" (+{len(ids) - limit} more, {len(ids)} in total)"
    return f"[{len(ids)}] {head}"


def read_labels(
    path: str | os.PathLike[str],
    task: str = "classification",
    label_col: str = "label",
    error: type[ValueError] = LabelsError,
) -> pd.DataFrame:
    """Read and check a label table; returns ``slide_id``, ``case_id`` (strings) and ``label``
    (stripped strings, read from ``label_col``) or ``time`` (float >= 0) + ``event`` (int 0/1).

    Raises ``error`` (a ``ValueError``) for: an unreadable file, missing columns, empty or duplicate
    slide ids, empty case ids, missing labels, a single class (classification), non-numeric/negative/
    infinite times, events other than 0/1.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: label CSV not found")
    try:
        table = pd.read_csv(path, dtype={"slide_id": str, "case_id": str, label_col: str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise error(f"{path}: cannot read label CSV ({' '.join(str(e).split())})") from e
    table.columns = [str(c).strip() for c in table.columns]
    target = [label_col] if task == "classification" else ["time", "event"]
    needed = ["slide_id", "case_id", *target]
    absent = [c for c in needed if c not in table.columns]
    if absent:
        hint = " (case_id = patient; repeat slide_id if each slide is its own patient)"
        if task == "classification" and label_col in absent:
            hint += "; --label-col names the class column"
        raise error(
            f"{path}: missing column(s) {absent} for task {task!r}; found {list(table.columns)}. "
            f"Required: {needed}{hint}."
        )
    table = table[needed].copy()
    if task == "classification" and label_col != "label":
        table = table.rename(columns={label_col: "label"})
    for col in ("slide_id", "case_id"):
        table[col] = table[col].astype("string").str.strip()
    blank = table.index[table["slide_id"].isna() | (table["slide_id"] == "")]
    if len(blank):
        raise error(f"{path}: empty slide_id on CSV row(s) {format_ids(blank + 2)}")
    table["slide_id"] = table["slide_id"].astype(str)
    nocase = table.loc[table["case_id"].isna() | (table["case_id"] == ""), "slide_id"]
    if len(nocase):
        raise error(f"{path}: empty case_id for slide_id {format_ids(nocase)}")
    table["case_id"] = table["case_id"].astype(str)
    dup = table.loc[table["slide_id"].duplicated(keep=False), "slide_id"].unique()
    if len(dup):
        raise error(f"{path}: duplicate slide_id(s) {format_ids(dup)}; each slide must appear once.")
    if task == "classification":
        table["label"] = table["label"].astype("string").str.strip()
        nolabel = table.loc[table["label"].isna() | (table["label"] == ""), "slide_id"]
        if len(nolabel):
            raise error(f"{path}: missing {label_col!r} for slide_id {format_ids(nolabel)} (drop those rows)")
        table["label"] = table["label"].astype(str)
        if table["label"].nunique() == 1:
            raise error(
                f"{path}: every slide has the label {table['label'].iloc[0]!r} in column {label_col!r}: "
                "classification needs at least two classes; add slides of another class or fix the labels"
            )
        return table
    time = pd.to_numeric(table["time"], errors="coerce")
    event = pd.to_numeric(table["event"], errors="coerce")
    bad_t = table.loc[~np.isfinite(time.to_numpy(dtype=float)) | (time < 0).to_numpy(), "slide_id"]
    if len(bad_t):
        raise error(
            f"{path}: 'time' must be a finite number >= 0 (no units, e.g. 12 not '12 months'); bad for "
            f"slide_id {format_ids(bad_t)}"
        )
    bad_e = table.loc[~event.isin([0, 1]), "slide_id"]
    if len(bad_e):
        raise error(
            f"{path}: 'event' must be 0 (censored) or 1 (observed), not yes/no; bad for slide_id "
            f"{format_ids(bad_e)}"
        )
    table["time"] = time.astype(float)
    table["event"] = event.astype(np.int64)
    return table
