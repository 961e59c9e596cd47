"""Synthetic slide writer: OpenSlide compatibility, mpp metadata, pyramid, determinism, content."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from gigaslide.synth import default_n_levels, make_layout, write_synthetic_slide


def test_openslide_reads_mpp_levels_and_pixels(tmp_path):
    path = write_synthetic_slide(tmp_path / "a.tiff", width=1000, height=700, mpp=0.25, seed=3)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert "mpp=0.250000" in s.properties["tiff.ImageDescription"]
        # 1000 -> 500 (>= 512? no): default pyramid keeps the longest side >= 512
        assert s.level_dimensions == ((1000, 700),)
        region = np.asarray(s.read_region((900, 600), 0, (100, 100)).convert("RGB"))
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == tifffile.COMPRESSION.JPEG
        direct = page.asarray()[600:700, 900:1000]
    np.testing.assert_array_equal(region, direct)


def test_pyramid_levels_are_power_of_two_downsamples(tmp_path):
    path = write_synthetic_slide(tmp_path / "p.tiff", width=2048, height=1536, seed=1)
    assert default_n_levels(2048, 1536) == 3
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        lvl0 = np.asarray(s.read_region((0, 0), 0, (2048, 1536)).convert("RGB"), dtype=np.float32)
        lvl2 = np.asarray(s.read_region((0, 0), 2, (512, 384)).convert("RGB"), dtype=np.float32)
    with tifffile.TiffFile(path) as tf:
        assert [int(p.subfiletype) for p in tf.pages] == [0, 1, 1]
        assert tf.pages[2].tags["XResolution"].value[0] / tf.pages[2].tags["XResolution"].value[1] == (
            pytest.approx(1e4 / 2.0)
        )
    # level 2 is the 4x4 box average of level 0 (up to JPEG error)
    box = lvl0.reshape(384, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(box - lvl2).mean() < 4.0


def test_explicit_levels_and_bad_arguments(tmp_path):
    path = write_synthetic_slide(tmp_path / "n.tiff", width=600, height=520, n_levels=3, seed=0)
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((600, 520), (300, 260), (150, 130))
    with pytest.raises(ValueError, match="n_levels=12 is impossible"):
        write_synthetic_slide(tmp_path / "x.tiff", width=600, height=520, n_levels=12)
    with pytest.raises(ValueError, match="multiple of 16"):
        write_synthetic_slide(tmp_path / "x.tiff", width=600, height=520, tile_size=100)
    with pytest.raises(ValueError, match="tumor_fraction"):
        write_synthetic_slide(tmp_path / "x.tiff", width=600, height=520, tumor_fraction=1.5)
    with pytest.raises(ValueError, match="unknown tumour pattern"):
        write_synthetic_slide(tmp_path / "x.tiff", width=600, height=520, tumor_pattern="spiral")
    assert not (tmp_path / "x.tiff").exists()
    assert not list(tmp_path.glob(".x.tiff*"))  # nothing half-written left behind


def test_deterministic_per_seed(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tiff", width=768, height=512, seed=11)
    b = write_synthetic_slide(tmp_path / "b.tiff", width=768, height=512, seed=11)
    c = write_synthetic_slide(tmp_path / "c.tiff", width=768, height=512, seed=12)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_chunked_render_has_no_seams():
    layout = make_layout(700, 500, seed=4, tumor_fraction=0.4)
    whole = layout.render(0, 0, 700, 500).astype(np.int16)
    left = layout.render(0, 0, 300, 500).astype(np.int16)
    right = layout.render(300, 0, 400, 500).astype(np.int16)
    joined = np.concatenate([left, right], axis=1)
    # per-window pixel noise differs, structure must not: tiny mean difference
    assert np.abs(joined - whole).mean() < 3.0


def _nuclear_fraction(rgb: np.ndarray, tissue: np.ndarray) -> float:
    """Fraction of tissue pixels that are dark purple (haematoxylin-dominated)."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    dark = (g < 130) & (b > r) & (b - g > 40)
    return float(dark[tissue].mean())


def test_tumor_fraction_controls_nuclear_density():
    fractions = {}
    for tf in (0.0, 0.5):
        layout = make_layout(1024, 1024, seed=2, tumor_fraction=tf)
        rgb = layout.render(0, 0, 1024, 1024)
        sat = rgb.max(axis=2).astype(int) - rgb.min(axis=2)
        fractions[tf] = _nuclear_fraction(rgb, sat > 25)
        assert layout.tumor_fraction == pytest.approx(tf, abs=0.02)
    assert fractions[0.5] > 3 * fractions[0.0]
    assert fractions[0.0] > 0.005  # normal tissue still has some nuclei


def test_background_white_and_tissue_coloured():
    layout = make_layout(1024, 768, seed=9, tumor_fraction=0.3)
    rgb = layout.render(0, 0, 1024, 768)
    # corners lie in the background margin: near-white, unsaturated
    corner = rgb[:20, :20].astype(int)
    assert corner.min() > 225 and (corner.max(axis=2) - corner.min(axis=2)).max() < 15
    tissue = np.kron(layout.tissue_mask(), np.ones((16, 16), bool))[:768, :1024]
    assert 0.1 < tissue.mean() < 0.9
    tis = rgb[tissue].astype(int)
    assert np.median(tis[:, 1]) < np.median(tis[:, 0])  # pink/purple: green is the most absorbed


def test_tumor_patterns_differ_spatially():
    border = make_layout(1024, 1024, seed=5, tumor_fraction=0.3, tumor_pattern="border")
    center = make_layout(1024, 1024, seed=5, tumor_fraction=0.3, tumor_pattern="center")
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(border.tissue_mask())
    assert dist[border.tumor_mask()].mean() < dist[center.tumor_mask()].mean() / 2
