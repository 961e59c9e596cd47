"""Where a folder of feature files came from: one encoder and one set of weights, or a refusal.

Every feature file written by ``gigaslide embed`` records its provenance in the attributes of its
``features`` dataset (``encoder``, ``weights``, ``weights_sha256``, ``random_init``; see
:mod:`gigaslide.data.features_io`). Training or probing on a folder that mixes encoders or weights
of the same dimension gives numbers that mean nothing, so :func:`check_provenance` refuses such a
folder, naming two files that disagree, unless mixing is allowed explicitly. Files written by other
tools (CLAM, TRIDENT) record nothing; they are counted as ``n_unrecorded`` and cannot be compared.

The resulting :class:`FeatureProvenance` goes into training and probe reports, which say loudly
when the features came from a random-init encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py

log = logging.getLogger(__name__)

#: attributes of `features` that identify the encoder and its weights
IDENTITY_KEYS = ("encoder", "weights_sha256")
PROVENANCE_KEYS = ("encoder", "weights", "weights_sha256", "random_init")


class ProvenanceError(ValueError):
    """Feature files from different encoders or weights in one folder."""


@dataclass
class FeatureProvenance:
    """The encoder and weights behind a set of feature files.

    ``encoder``, ``weights``, ``weights_sha256`` and ``random_init`` describe the files that record
    them (all alike unless ``mixed``); ``sources`` lists every distinct provenance with a file of it.
    """

    encoder: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    random_init: bool = False
    n_files: int = 0
    n_unrecorded: int = 0  # files without provenance attributes (e.g. written by CLAM or TRIDENT)
    mixed: bool = False
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self) -> str | None:
        """A loud one-line warning for reports, or None when the features are trustworthy."""
        if self.random_init:
            return (
                "WARNING: the features come from a RANDOM-INIT encoder (no pretrained weights); "
                "these results only test the pipeline and say nothing about the data"
            )
        if self.mixed:
            return (
                f"WARNING: the features mix {len(self.sources)} encoders/weights (allowed explicitly); "
                "the results are not those of one encoder"
            )
        return None


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance attributes of one feature file (empty for ``.pt`` files and foreign HDF5)."""
    p = Path(path)
    if p.suffix not in (".h5", ".hdf5"):
        return {}
    with h5py.File(p, "r") as f:
        if "features" not in f:
            return {}
        attrs = f["features"].attrs
        out: dict[str, Any] = {}
        for key in PROVENANCE_KEYS:
            if key in attrs:
                value = attrs[key]
                value = value.decode() if isinstance(value, bytes) else value
                out[key] = bool(value) if key == "random_init" else str(value)
        return out


def _describe(prov: Mapping[str, Any]) -> str:
    sha = str(prov.get("weights_sha256") or "")[:12]
    weights = "RANDOM-INIT" if prov.get("random_init") else prov.get("weights") or "?"
    return f"encoder {prov.get('encoder', '?')}, weights {weights} (sha256 {sha or '?'})"


def check_provenance(
    files: Mapping[str, str | os.PathLike[str]], allow_mixed: bool = False, source: str = "features"
) -> FeatureProvenance:
    """Provenance of ``files`` (slide id -> feature file); refuse a mix of encoders or weights.

    Raises:
        ProvenanceError: two files record different ``encoder`` or ``weights_sha256`` and
            ``allow_mixed`` is False; the message names one file of each.
    """
    groups: dict[tuple[str, ...], tuple[dict[str, Any], Path]] = {}
    unrecorded = 0
    for path in files.values():
        prov = read_provenance(path)
        if not any(k in prov for k in IDENTITY_KEYS):
            unrecorded += 1
            continue
        key = tuple(str(prov.get(k, "")) for k in IDENTITY_KEYS)
        groups.setdefault(key, (prov, Path(path)))
    result = FeatureProvenance(n_files=len(files), n_unrecorded=unrecorded)
    result.sources = [{**prov, "example_file": str(path)} for prov, path in groups.values()]
    if len(groups) > 1:
        (p1, f1), (p2, f2) = list(groups.values())[:2]
        msg = (
            f"{source}: feature files come from {len(groups)} different encoders/weights, e.g. {f1} "
            f"({_describe(p1)}) and {f2} ({_describe(p2)})"
        )
        if not allow_mixed:
            raise ProvenanceError(
                msg + "; embed every slide with one encoder and one weights file (or pass "
                "--allow-mixed-features to use them anyway)"
            )
        log.warning("WARNING %s; using them anyway (mixing allowed)", msg)
        result.mixed = True
    if groups:
        first = next(iter(groups.values()))[0]
        result.encoder = first.get("encoder")
        result.weights = first.get("weights")
        result.weights_sha256 = first.get("weights_sha256")
        result.random_init = any(bool(p.get("random_init")) for p, _ in groups.values())
    if unrecorded and groups:
        log.warning(
            "%s: %d of %d feature files record no encoder/weights; they cannot be checked against the rest",
            source,
            unrecorded,
            len(files),
        )
    return result
