"""Backend registry: listing, availability, explicit and automatic choice, error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigaslide.io import (
    BackendUnavailableError,
    Slide,
    SlideReadError,
    available_backends,
    list_backends,
    open_slide,
    register_backend,
    unregister_backend,
)


def test_builtin_backends_in_auto_choice_order() -> None:
    names = list_backends()
    assert names[:1] == ["tiff-direct"]
    order = [n for n in names if n in {"tiff-direct", "openslide", "tiffslide", "image"}]
    assert order == ["tiff-direct", "openslide", "tiffslide", "image"]
    assert "cucim" in names
    avail = available_backends()
    assert {"tiff-direct", "openslide", "tiffslide", "image"} <= set(avail)
    assert [n for n in names if n in avail] == avail  # same order


def test_unknown_backend_lists_known_names(pyramid_tiff: Path) -> None:
    with pytest.raises(ValueError, match="unknown slide backend 'nope'") as info:
        open_slide(pyramid_tiff, backend="nope")
    for name in ("tiff-direct", "openslide", "tiffslide", "image", "cucim"):
        assert name in str(info.value)


def test_backend_name_is_normalised(pyramid_tiff: Path) -> None:
    assert open_slide(pyramid_tiff, backend="Tiff_Direct").backend == "tiff-direct"


@pytest.mark.skipif("cucim" in available_backends(), reason="cuCIM is installed here")
def test_cucim_unavailable_gives_clear_message(pyramid_tiff: Path) -> None:
    with pytest.raises(
        BackendUnavailableError, match=r"'cucim' is not available.*import cucim.*pip install cucim"
    ):
        open_slide(pyramid_tiff, backend="cucim")
    assert "cucim" not in available_backends()


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.svs"
    with pytest.raises(SlideReadError, match=r"nowhere\.svs: file not found"):
        open_slide(missing)
    with pytest.raises(SlideReadError, match=r"nowhere\.svs"):
        open_slide(missing, backend="openslide")


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf")])
def test_invalid_mpp_rejected(pyramid_tiff: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="mpp must be a positive"):
        open_slide(pyramid_tiff, mpp=bad)


def test_auto_choice_lists_every_backend_reason(tmp_path: Path) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"definitely not an image" * 10)
    with pytest.raises(SlideReadError) as info:
        open_slide(junk)
    msg = str(info.value)
    assert msg.startswith(f"{junk}: no slide reader backend could open this file")
    for name in available_backends():
        assert f"  - {name}: " in msg
    missing = [n for n in list_backends() if n not in available_backends()]
    if missing:  # named, but no install hint: installing another reader would not fix a junk file
        assert f"(not installed here: {', '.join(missing)})" in msg and "pip install" not in msg


class _ConstantSlide(Slide):
    """A 1-level grey slide used to test plugin registration."""

    backend = "constant"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        if Path(path).suffix != ".const":
            raise SlideReadError(f"{path}: not a .const file")
        self.level_dimensions = ((64, 32),)
        self.level_downsamples = (1.0,)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return np.full((height, width, 3), 7, dtype=np.uint8)


def test_register_custom_backend_priority_and_duplicates(tmp_path: Path, pyramid_tiff: Path) -> None:
    target = tmp_path / "a.const"
    target.write_bytes(b"x")
    register_backend("constant", _ConstantSlide, priority=1)
    try:
        assert list_backends()[0] == "constant"
        with pytest.raises(ValueError, match="already registered"):
            register_backend("constant", _ConstantSlide)
        slide = open_slide(target)
        assert slide.backend == "constant"
        assert slide.read_region((60, 0), 0, (8, 4))[:, :4].tolist() == [[[7, 7, 7]] * 4] * 4
        assert (slide.read_region((60, 0), 0, (8, 4))[:, 4:] == 255).all()  # padding beyond width 64
        # a file it refuses falls through to the built-in backends, with its reason recorded
        assert open_slide(pyramid_tiff).backend == "tiff-direct"
    finally:
        unregister_backend("constant")
    assert "constant" not in list_backends()


def test_factory_registration_and_requirement(tmp_path: Path) -> None:
    target = tmp_path / "b.const"
    target.write_bytes(b"x")
    register_backend("needs-missing", _ConstantSlide, priority=2, requires=("gigaslide_no_such_module",))
    try:
        assert "needs-missing" in list_backends()
        assert "needs-missing" not in available_backends()
        with pytest.raises(BackendUnavailableError, match="gigaslide_no_such_module"):
            open_slide(target, backend="needs-missing")
    finally:
        unregister_backend("needs-missing")
