"""Tissue detection: known masks, ink, borders, specks, holes, tissue fraction, GeoJSON, real slide."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from shapely.geometry import shape

from gigaslide.io import open_slide
from gigaslide.preprocess.tissue import TissueMask, TissueParams, detect_tissue, detect_tissue_array
from gigaslide.synth import make_layout, write_synthetic_slide

MPP = 8.0  # um per pixel of the synthetic thumbnails below


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def he_image(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """White glass with pink/purple textured tissue where ``truth`` is True; (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    h, w = truth.shape
    img = np.full((h, w, 3), 243.0) + rng.normal(0, 1.5, (h, w, 1))
    pink = np.array([225.0, 150.0, 190.0]) + rng.normal(0, 12, (h, w, 1))
    purple = np.array([120.0, 80.0, 150.0])
    nuclei = rng.random((h, w)) < 0.2
    tissue_rgb = np.where(nuclei[..., None], purple, pink)
    img = np.where(truth[..., None], tissue_rgb, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def blobs(h: int = 300, w: int = 400) -> np.ndarray:
    truth = np.zeros((h, w), np.uint8)
    cv2.ellipse(truth, (140, 150), (90, 110), 20, 0, 360, 1, -1)
    cv2.ellipse(truth, (300, 120), (60, 45), -30, 0, 360, 1, -1)
    return truth.astype(bool)


def test_known_tissue_found():
    truth = blobs()
    mask = detect_tissue_array(he_image(truth), mpp=MPP)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert iou(mask, truth) > 0.95


def test_pen_marks_removed_on_background_and_over_tissue():
    truth = blobs()
    img = he_image(truth)
    strokes = {
        "blue": (30, 70, 200),
        "green": (40, 150, 70),
        "black": (25, 25, 30),
        "cyan": (20, 140, 150),
    }
    ink = np.zeros(truth.shape, np.uint8)
    for i, colour in enumerate(strokes.values()):
        y = 40 + 60 * i
        cv2.line(img, (10, y), (390, y + 30), colour, 5)  # crosses background and tissue
        cv2.line(ink, (10, y), (390, y + 30), 1, 5)
    ink = ink.astype(bool)
    mask = detect_tissue_array(img, mpp=MPP)
    assert not (mask & ink).any()
    assert iou(mask, truth & ~ink) > 0.85
    # without pen removal the coloured ink over glass is taken for tissue
    raw = detect_tissue_array(img, TissueParams(remove_pen=False), mpp=MPP)
    coloured = ink & ~truth
    assert raw[coloured].mean() > 0.3


def test_haematoxylin_is_not_pen():
    """Dense purple (nuclei-rich) tissue must survive the blue-ink rule."""
    truth = blobs()
    img = he_image(truth)
    img[truth] = (95, 75, 155)  # solid hyperchromatic tumour
    assert iou(detect_tissue_array(img, mpp=MPP), truth) > 0.95


def test_out_of_focus_dark_red_and_purple_ink_removed_eosin_kept():
    """Blurred dark red / purple marker strokes are ink; eosin-rich (bright, saturated) tissue stays."""
    truth = blobs()
    img = he_image(truth).astype(np.float32)
    rng = np.random.default_rng(1)
    eosin = np.zeros_like(truth)
    cv2.ellipse(eosin.view(np.uint8), (140, 150), (60, 70), 20, 0, 360, 1, -1)
    # eosin-rich: red cells / dense eosin, saturated (~0.8) but bright (value ~0.8), textured
    red_cells = np.array([205.0, 45.0, 100.0]) + rng.normal(0, 10, (*truth.shape, 1))
    img = np.where(eosin[..., None], red_cells, img)
    ink = np.zeros(truth.shape, np.float32)
    paint = np.zeros((*truth.shape, 3), np.float32)
    strokes = [((20, 40, 380, 90), (120, 20, 45)), ((20, 250, 380, 200), (75, 30, 105))]  # dark red, purple
    for (x0, y0, x1, y1), colour in strokes:
        stroke = np.zeros(truth.shape, np.float32)
        cv2.line(stroke, (x0, y0), (x1, y1), 1.0, 14)  # 14 px = 112 um wide marker stroke
        paint += stroke[..., None] * np.array(colour, np.float32)
        ink = np.maximum(ink, stroke)
    alpha = cv2.GaussianBlur(ink, (0, 0), 3)[..., None]  # out of focus: smooth edges
    colour = cv2.GaussianBlur(paint, (0, 0), 3) / np.maximum(alpha, 1e-6)
    img = np.clip(img * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)
    core = cv2.erode(ink, np.ones((9, 9), np.uint8)).astype(bool)  # the stroke minus its blurred rim
    raw = detect_tissue_array(img, TissueParams(remove_pen=False), mpp=MPP)
    assert raw[core & ~truth].mean() > 0.9  # without the ink rules the strokes pass as tissue
    mask = detect_tissue_array(img, mpp=MPP)
    assert not (mask & core).any()
    kept_eosin = eosin & ~cv2.dilate(ink, np.ones((9, 9), np.uint8)).astype(bool)
    assert mask[kept_eosin].mean() > 0.97
    assert iou(mask, truth & ~(alpha[..., 0] > 0.05)) > 0.85


def test_dark_tissue_is_not_dark_ink():
    """Dark, moderately saturated tissue (epidermis, dense nuclei: S ~0.5, V ~0.4) is kept."""
    truth = blobs()
    img = he_image(truth)
    rng = np.random.default_rng(2)
    dark = np.array([104.0, 53.0, 88.0]) + rng.normal(0, 8, (*truth.shape, 1))
    img = np.where(truth[..., None], np.clip(dark, 0, 255), img).astype(np.uint8)
    assert iou(detect_tissue_array(img, mpp=MPP), truth) > 0.95


def test_black_border_and_dark_edge_excluded():
    truth = blobs()
    img = he_image(truth)
    img[:, :25] = 0  # scanner border
    img[-20:, :] = (70, 70, 75)  # dark slide edge (grey, unsaturated)
    img[:12, :] = (5, 3, 8)  # black with noisy colour
    mask = detect_tissue_array(img, mpp=MPP)
    assert not mask[:, :25].any() and not mask[-20:].any() and not mask[:12].any()
    assert iou(mask, truth & ~(np.arange(400) < 25)[None, :]) > 0.93


def test_white_background_is_empty():
    img = he_image(np.zeros((200, 200), bool))
    assert not detect_tissue_array(img, mpp=MPP).any()


def test_min_area_filter_drops_specks():
    truth = blobs()
    specks = np.zeros_like(truth)
    for x, y in [(30, 280), (380, 280), (370, 20), (250, 260)]:
        specks[y - 2 : y + 2, x - 2 : x + 2] = True  # 16 px * 64 um^2 = 1024 um^2
    mask = detect_tissue_array(he_image(truth | specks), mpp=MPP)
    assert not mask[specks].any()
    assert iou(mask, truth) > 0.95
    # with a tiny min area the specks stay
    keep = detect_tissue_array(
        he_image(truth | specks), TissueParams(min_tissue_area_um2=100.0, median_um=1.0), mpp=MPP
    )
    assert keep[specks].mean() > 0.5


def test_holes_filled_up_to_size():
    truth = np.zeros((300, 300), bool)
    truth[20:280, 20:280] = True
    small = np.zeros_like(truth)
    small[60:66, 60:66] = True  # 36 px = 2304 um^2: filled
    big = np.zeros_like(truth)
    big[150:230, 150:230] = True  # 6400 px = 409600 um^2: kept as a hole
    mask = detect_tissue_array(he_image(truth & ~small & ~big), mpp=MPP)
    assert mask[small].all()
    assert mask[big].mean() < 0.05
    assert iou(mask, truth & ~big) > 0.95
    tm = TissueMask.from_mask(mask, (4.0, 4.0), he_image(truth))
    assert len(tm.polygons) == 1 and len(tm.polygons[0].interiors) == 1
    hole = tm.polygons[0].interiors[0]
    assert shape({"type": "Polygon", "coordinates": [list(hole.coords)]}).area == pytest.approx(
        80 * 80 * 16, rel=0.1
    )


def test_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = cv2.GaussianBlur(rng.random((50, 70)), (0, 0), 3) > 0.5
    ds = 4
    tm = TissueMask.from_mask(mask, (ds, ds), np.zeros((50, 70, 3), np.uint8))
    full = np.kron(mask, np.ones((ds, ds), bool))  # level-0 raster (200, 280)
    size = 37
    coords = np.column_stack([rng.integers(-40, 300, 300), rng.integers(-40, 220, 300)])
    got = tm.tissue_fraction(coords, size)
    padded = np.zeros((full.shape[0] + 2 * 64, full.shape[1] + 2 * 64), bool)
    padded[64:-64, 64:-64] = full
    want = np.array([padded[y + 64 : y + 64 + size, x + 64 : x + 64 + size].mean() for x, y in coords])
    assert got.shape == (300,)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert tm.tissue_fraction(np.zeros((0, 2)), size).shape == (0,)
    with pytest.raises(ValueError, match="size_level0"):
        tm.tissue_fraction(coords, 0)


def test_tissue_fraction_non_integer_downsample():
    rng = np.random.default_rng(1)
    mask = rng.random((30, 40)) > 0.5
    tm = TissueMask.from_mask(mask, (2.5, 2.5), np.zeros((30, 40, 3), np.uint8))
    # reference on a 10x finer raster: mask pixel i covers level-0 [2.5 i, 2.5 i + 2.5)
    fine = np.kron(mask, np.ones((25, 25), bool))  # 0.1 level-0 px per fine px
    coords = np.array([[0, 0], [3, 7], [50, 20], [95, 70], [-5, 10]])
    size = 12
    want = []
    for x, y in coords:
        xs, ys = max(0, x * 10), max(0, y * 10)
        want.append(fine[ys : (y + size) * 10, xs : (x + size) * 10].sum() / (size * 10) ** 2)
    np.testing.assert_allclose(tm.tissue_fraction(coords, size), want, atol=1e-9)


def test_geojson_round_trip():
    truth = np.zeros((120, 160), bool)
    cv2.circle(truth.view(np.uint8), (50, 60), 35, 1, -1)
    truth[50:70, 40:60] = False  # a hole
    truth[20:60, 110:150] = True  # second piece
    tm = TissueMask.from_mask(truth, (8.0, 8.0), np.zeros((120, 160, 3), np.uint8))
    gj = json.loads(json.dumps(tm.to_geojson()))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    geoms = [shape(f["geometry"]) for f in gj["features"]]
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms)
    assert sum(len(g.interiors) for g in geoms) == 1
    for g, p in zip(geoms, tm.polygons):
        assert g.equals(p)
    # level-0 coordinates: total area ~ mask pixels * 64
    assert sum(g.area for g in geoms) == pytest.approx(truth.sum() * 64, rel=0.08)
    minx, miny, maxx, maxy = np.array([g.bounds for g in geoms]).T
    assert minx.min() >= 0 and miny.min() >= 0 and maxx.max() <= 160 * 8 and maxy.max() <= 120 * 8


def test_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_tissue_array(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="mask_mpp"):
        TissueParams(mask_mpp=0)


def test_detect_on_synthetic_slide(tmp_path):
    layout = make_layout(2048, 1536, seed=7, tumor_fraction=0.4)
    path = write_synthetic_slide(tmp_path / "s.tiff", 2048, 1536, seed=7, tumor_fraction=0.4)
    with open_slide(path) as slide:
        tm = detect_tissue(slide)
    assert tm.downsample == (16.0, 16.0) and tm.mpp == pytest.approx(8.0)
    assert tm.mask.shape == layout.tissue_mask().shape
    assert iou(tm.mask, layout.tissue_mask()) > 0.9
    assert tm.thumbnail.shape == (*tm.mask.shape, 3)


def test_cmu1_real_slide(shared_data):
    with open_slide(shared_data / "cmu-1-small-region.svs") as slide:
        tm = detect_tissue(slide)
        assert tm.mpp == pytest.approx(slide.mpp * tm.downsample[0])
    assert 0.15 < tm.area_fraction < 0.7
    h = tm.mask.shape[0]
    c = max(3, h // 10)
    for corner in (tm.mask[:c, :c], tm.mask[:c, -c:], tm.mask[-c:, :c]):
        assert not corner.any()
    fr = tm.tissue_fraction(np.array([[0, 0], [900, 2200]]), 256)
    assert fr[0] == 0.0 and fr[1] > 0.9  # empty corner vs the tissue centre


def test_no_mpp_slide_uses_fallback_thumbnail(shared_data, caplog):
    with caplog.at_level(logging.WARNING), open_slide(shared_data / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert slide.mpp is None
        tm = detect_tissue(slide, TissueParams(fallback_max_size=600))
    assert max(tm.mask.shape) == 600 and tm.mpp is None
    assert "no mpp" in caplog.text
    assert 0.3 < tm.area_fraction < 0.9


@pytest.mark.parametrize(
    ("name", "mpp"), [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)]
)
def test_dark_ink_rule_keeps_real_tissue(shared_data, name: str, mpp: float | None) -> None:
    """On real H&E (CMU-1's dark epidermis, TCGA's eosin) the dark-ink rule removes nothing."""
    from dataclasses import replace

    from gigaslide.preprocess.pen import PenRules

    with open_slide(shared_data / name, mpp=mpp) as slide:
        with_rule = detect_tissue(slide)
        off = PenRules(dark_ink_min_sat=2.0)  # a saturation no pixel reaches: rule disabled
        without = detect_tissue(slide, replace(TissueParams(), pen=off))
    assert with_rule.mask.sum() > 1000
    np.testing.assert_array_equal(with_rule.mask, without.mask)


def test_report_names_the_rule_that_removed_everything():
    from gigaslide.preprocess.tissue import detect_tissue_report

    img = he_image(np.zeros((200, 300), bool))
    mask, report = detect_tissue_report(img, mpp=MPP)
    assert not mask.any() and "no stained (saturated) pixel" in report.why_empty()
    cv2.rectangle(img, (50, 50), (250, 150), (40, 150, 70), -1)  # a green ink blot, nothing else
    mask, report = detect_tissue_report(img, mpp=MPP)
    assert not mask.any() and report.ink_um2 == pytest.approx(201 * 101 * MPP**2, rel=0.01)
    assert "taken for marker ink (--keep-ink keeps it)" in report.why_empty()
    truth = np.zeros((200, 300), bool)
    truth[90:100, 90:100] = True  # 100 px = 6,400 um^2 < 20,000
    mask, report = detect_tissue_report(he_image(truth), mpp=MPP)
    assert not mask.any() and report.small_um2 > 0 and "--min-tissue-area" in report.why_empty()
    assert report.kept_um2 == 0 and report.min_tissue_area_um2 == 20_000
