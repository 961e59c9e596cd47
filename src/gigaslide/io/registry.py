"""Reader backends registered by name, and :func:`open_slide`, which picks one.

Each backend is a :class:`~gigaslide.io.base.Slide` subclass (or a factory with the same
call signature ``factory(path, mpp=None) -> Slide``) plus the Python modules it needs.
Backends import those modules lazily, so a missing optional dependency (cuCIM) only
makes that backend unavailable.

Automatic choice tries the available backends in priority order (lower number first):
``tiff-direct`` (fast direct JPEG-tile decoding), ``cucim`` (when installed),
``openslide``, ``tiffslide``, ``image``. The first one that opens the file wins; when
none can, :class:`SlideReadError` lists every backend's reason.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gigaslide.io.backend_utils import check_file, describe_error
from gigaslide.io.base import Slide, SlideReadError
from gigaslide.io.cucim_backend import CuCIMSlide
from gigaslide.io.image_backend import ImageSlide
from gigaslide.io.openslide_backend import OpenSlideSlide
from gigaslide.io.tiff_direct import TiffDirectSlide
from gigaslide.io.tiffslide_backend import TiffSlideSlide

logger = logging.getLogger(__name__)

BackendFactory = Callable[..., Slide]


class BackendUnavailableError(SlideReadError):
    """A backend was requested by name but its dependency cannot be imported."""


@dataclass(frozen=True)
class BackendInfo:
    """One registered backend: how to build it, when to try it and what it needs to import."""

    name: str
    factory: BackendFactory
    priority: int
    requires: tuple[str, ...]
    install_hint: str


_REGISTRY: dict[str, BackendInfo] = {}
_IMPORT_ERRORS: dict[str, str | None] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_backend(
    name: str,
    cls_or_factory: BackendFactory,
    priority: int = 100,
    requires: tuple[str, ...] | None = None,
    install_hint: str | None = None,
    replace: bool = False,
) -> None:
    """Register a reader backend under ``name``.

    ``cls_or_factory(path, mpp=None)`` must return a :class:`Slide` or raise (preferably
    :class:`SlideReadError`) when it cannot read the file. ``priority``: lower is tried
    first by automatic choice. ``requires``: importable module names the backend needs;
    defaults to the class attribute ``requires`` when present. Re-registering an existing
    name raises ``ValueError`` unless ``replace=True``.
    """
    key = _normalise(name)
    if not key:
        raise ValueError("backend name must not be empty")
    if key in _REGISTRY and not replace:
        raise ValueError(f"slide backend {key!r} is already registered (pass replace=True to override it)")
    if not callable(cls_or_factory):
        raise TypeError(f"backend {key!r}: expected a Slide subclass or factory, got {cls_or_factory!r}")
    if requires is None:
        requires = tuple(getattr(cls_or_factory, "requires", ()))
    hint = install_hint or getattr(cls_or_factory, "install_hint", "") or f"pip install {' '.join(requires)}"
    _REGISTRY[key] = BackendInfo(key, cls_or_factory, int(priority), tuple(requires), hint)


def unregister_backend(name: str) -> None:
    """Remove a backend (mainly for tests and plugins); unknown names raise ``ValueError``."""
    _REGISTRY.pop(_lookup(name).name)


def list_backends() -> list[str]:
    """All registered backend names, in automatic-choice order (available or not)."""
    return [info.name for info in sorted(_REGISTRY.values(), key=lambda i: i.priority)]


def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else the reason (cached per process)."""
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[module] = None
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _IMPORT_ERRORS[module] = describe_error(exc)
    return _IMPORT_ERRORS[module]


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be used here (None when it can)."""
    info = _lookup(name)
    for module in info.requires:
        err = _import_error(module)
        if err is not None:
            return f"`import {module}` failed ({err}); install it with `{info.install_hint}`"
    return None


def available_backends() -> list[str]:
    """Registered backends whose dependencies import, in automatic-choice order."""
    return [name for name in list_backends() if backend_unavailable_reason(name) is None]


def _lookup(name: str) -> BackendInfo:
    key = _normalise(name)
    if key not in _REGISTRY:
        known = ", ".join(list_backends())
        raise ValueError(f"unknown slide backend {name!r}; known backends: {known}")
    return _REGISTRY[key]


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _open_with(info: BackendInfo, path: Path, mpp: float | None) -> Slide:
    try:
        slide = info.factory(path, mpp=mpp)
    except SlideReadError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise SlideReadError(f"{path}: {describe_error(exc)}") from exc
    if not isinstance(slide, Slide):
        raise SlideReadError(f"{path}: backend {info.name!r} returned {type(slide).__name__}, not a Slide")
    return slide


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    backend: str | None = None,
    default_mpp: float | None = None,
) -> Slide:
    """Open a whole-slide image (or plain image) for reading.

    Args:
        path: the slide file.
        mpp: level-0 microns per pixel; when given it overrides the file's metadata (a warning is
            logged when the two differ by more than 1%).
        backend: a name from :func:`list_backends`; None chooses automatically.
        default_mpp: level-0 mpp used only when the file has none (``--slide-mpp``).

    Raises:
        SlideReadError: the file is missing or no (or the requested) backend can read it;
            the message names the file and every backend's reason.
        BackendUnavailableError: the requested backend's dependency is not installed.
        ValueError: unknown backend name, or an invalid ``mpp``.
    """
    path = Path(path)
    for name, value in (("mpp", mpp), ("default_mpp", default_mpp)):
        if value is not None and (not math.isfinite(float(value)) or float(value) <= 0):
            raise ValueError(f"{path}: {name} must be a positive number of microns per pixel, got {value!r}")
    slide = _open_any(path, mpp, backend)
    if mpp is not None and slide.metadata_mpp and abs(float(mpp) / slide.metadata_mpp - 1.0) > 0.01:
        logger.warning(
            "%s: the given mpp %.4g overrides the file's own %.4g um/px",
            path,
            float(mpp),
            slide.metadata_mpp,
        )
    if slide.mpp is None and default_mpp is not None:
        slide._mpp_override = float(default_mpp)
    return slide


def _open_any(path: Path, mpp: float | None, backend: str | None) -> Slide:
    if backend is not None:
        info = _lookup(backend)
        reason = backend_unavailable_reason(info.name)
        if reason is not None:
            raise BackendUnavailableError(f"{path}: slide backend {info.name!r} is not available: {reason}")
        check_file(path)
        try:
            return _open_with(info, path, mpp)
        except SlideReadError as exc:
            raise SlideReadError(
                f"{path}: backend {info.name!r} cannot read this file: {_strip_path(str(exc), path)}"
            ) from exc
    check_file(path)
    reasons: list[str] = []
    unavailable: dict[str, str] = {}
    for name in list_backends():
        info = _REGISTRY[name]
        reason = backend_unavailable_reason(name)
        if reason is not None:
            unavailable[name] = reason
            continue
        try:
            return _open_with(info, path, mpp)
        except SlideReadError as exc:
            reasons.append(f"  - {name}: {_strip_path(str(exc), path)}")
    if reasons:  # the installed readers refused the file: installing another one is rarely the fix
        if unavailable:
            reasons.append(f"  (not installed here: {', '.join(unavailable)})")
    else:  # nothing could even try: then the install hints are the fix
        reasons = [f"  - {name}: not available ({reason})" for name, reason in unavailable.items()]
    listing = "\n".join(reasons) if reasons else "  (no backends are registered)"
    raise SlideReadError(f"{path}: no slide reader backend could open this file:\n{listing}")


register_backend("tiff-direct", TiffDirectSlide, priority=10)
register_backend("cucim", CuCIMSlide, priority=20)
register_backend("openslide", OpenSlideSlide, priority=30)
register_backend("tiffslide", TiffSlideSlide, priority=40)
register_backend("image", ImageSlide, priority=50)
