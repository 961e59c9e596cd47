"""Physical-resolution metadata: microns per pixel and objective power from slide headers.

Readers call these helpers so that every backend interprets the same tags the same way:

* Aperio ``ImageDescription`` (``... |MPP = 0.4990|AppMag = 20|...``),
* TIFF ``XResolution`` / ``YResolution`` with ``ResolutionUnit`` centimeter or inch,
* backend property dictionaries (``openslide.mpp-x``, ``tiffslide.mpp-x``, ...).

A resolution tag is only trusted when it is *meaningful* for a microscope scan: the
unit must be centimeter or inch and the resulting level-0 mpp must lie in
``[MIN_MPP, MAX_MPP]``. This rejects the 72/96/300 dpi defaults that image editors
write (they give 85-350 um/px) while accepting any brightfield scan from 100x down to
roughly 1x magnification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MIN_MPP = 0.01  # um/px; finer than any light microscope
MAX_MPP = 20.0  # um/px; coarser than this is a photograph / screen dpi default, not a slide scan

# TIFF ResolutionUnit values -> microns per unit
_UNIT_MICRONS = {2: 25_400.0, 3: 10_000.0}  # 2 = inch, 3 = centimeter
_UNIT_NAMES = {"inch": 2, "centimeter": 3, "cm": 3, "in": 2}


def plausible_mpp(value: float | None) -> float | None:
    """Return ``value`` if it is a finite mpp within ``[MIN_MPP, MAX_MPP]``, else None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or not MIN_MPP <= v <= MAX_MPP:
        return None
    return v


def _as_float(value: object) -> float | None:
    """A TIFF RATIONAL (tuple numerator, denominator), a number or a numeric string as float."""
    if value is None:
        return None
    try:
        if isinstance(value, (tuple, list)):
            if len(value) != 2 or float(value[1]) == 0:
                return None
            return float(value[0]) / float(value[1])
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def mpp_from_resolution(xres: object, yres: object, unit: object) -> float | None:
    """Level-0 mpp from TIFF resolution tags, or None when they are absent or not meaningful.

    ``xres``/``yres`` are pixels per unit (RATIONAL tuples or numbers); ``unit`` is the
    ResolutionUnit as int (1 none, 2 inch, 3 centimeter) or its name. When both axes are
    given they are averaged.
    """
    if isinstance(unit, str):
        unit_code = _UNIT_NAMES.get(unit.strip().lower())
    else:
        try:
            unit_code = int(unit) if unit is not None else None  # type: ignore[call-overload]
        except (TypeError, ValueError):
            unit_code = None
    if unit_code not in _UNIT_MICRONS:
        return None
    microns = _UNIT_MICRONS[unit_code]
    values = []
    for res in (xres, yres):
        r = _as_float(res)
        if r is not None and r > 0 and math.isfinite(r):
            values.append(microns / r)
    if not values:
        return None
    return plausible_mpp(sum(values) / len(values))


def mpp_from_tiff_page(page: object) -> float | None:
    """Level-0 mpp from a :class:`tifffile.TiffPage`'s resolution tags (None when not meaningful)."""
    tags = page.tags  # type: ignore[attr-defined]

    def value(name: str) -> object:
        tag = tags.get(name)
        return tag.value if tag is not None else None

    return mpp_from_resolution(value("XResolution"), value("YResolution"), value("ResolutionUnit"))


def parse_aperio_description(description: str) -> dict[str, str]:
    """Key/value pairs of an Aperio ``ImageDescription`` (``header|Key = value|Key = value``).

    Returns an empty dict when the text is not an Aperio description. Repeated keys keep
    the first value, as OpenSlide does.
    """
    if not description.startswith("Aperio"):
        return {}
    out: dict[str, str] = {}
    for item in description.split("|")[1:]:
        key, sep, val = item.partition("=")
        if sep:
            out.setdefault(key.strip(), val.strip())
    return out


def mpp_from_properties(props: Mapping[str, str], keys: tuple[str, ...]) -> float | None:
    """Mean of the plausible mpp values stored under ``keys`` (e.g. ``openslide.mpp-x``, ``-y``)."""
    values = [plausible_mpp(_as_float(props.get(k))) for k in keys]
    found = [v for v in values if v is not None]
    if not found:
        return None
    return sum(found) / len(found)


def objective_from_properties(props: Mapping[str, str], keys: tuple[str, ...]) -> float | None:
    """The first positive finite objective power found under ``keys``."""
    for k in keys:
        v = _as_float(props.get(k))
        if v is not None and math.isfinite(v) and v > 0:
            return v
    return None
