import io

import numpy as np
import pytest
from PIL import Image

from prn import viz

H, W = 40, 48


def panel(png: np.ndarray, index: int, top: int, h: int = H, w: int = W) -> np.ndarray:
    """The index-th panel of a one-row picture whose panels start at row `top`."""
    x = viz.GAP + index * (w + viz.GAP)
    return png[top:top + h, x:x + w]


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_overlay_png_has_four_panels_in_a_row(tmp_path, image):
    amap = np.zeros((H, W), np.float32)
    path = viz.save_overlay(tmp_path / "sub" / "o.png", image, amap, np.zeros((H, W), bool),
                            panel_size=None)
    width, height = Image.open(path).size
    assert (width, height) == (4 * W + 5 * viz.GAP, viz.LABEL_HEIGHT + H + 2 * viz.GAP)
    titled = viz.save_overlay(tmp_path / "t.png", image, amap, None, title="bottle/000", panel_size=None)
    assert Image.open(titled).size[1] == height + viz.TITLE_HEIGHT


def test_overlay_panels_are_scaled_to_panel_size_keeping_aspect(tmp_path, image):
    path = viz.save_overlay(tmp_path / "o.png", image, np.zeros((H, W)), panel_size=96)
    # The longer side (W = 48) becomes 96, so H = 40 becomes 80.
    assert Image.open(path).size == (4 * 96 + 5 * viz.GAP, viz.LABEL_HEIGHT + 80 + 2 * viz.GAP)


def test_overlay_shows_the_image_and_mask_unchanged(tmp_path, image):
    mask = np.zeros((H, W), bool)
    mask[5:15, 10:30] = True
    path = viz.save_overlay(tmp_path / "o.png", image, np.zeros((H, W)), mask, panel_size=None)
    png = np.asarray(Image.open(path).convert("RGB"))
    top = viz.LABEL_HEIGHT + viz.GAP
    assert np.array_equal(panel(png, 0, top), image)
    assert np.array_equal(panel(png, 1, top)[..., 0] == 255, mask)


def test_heat_map_panel_differs_exactly_where_the_maps_differ(tmp_path, image):
    a = np.full((H, W), 0.1, np.float32)
    b = a.copy()
    b[20:30, 5:25] = 0.9
    top = viz.LABEL_HEIGHT + viz.GAP
    pa, pb = (np.asarray(Image.open(viz.save_overlay(tmp_path / f"{i}.png", image, amap, panel_size=None)))
              for i, amap in enumerate((a, b)))
    changed = np.any(panel(pa, 2, top) != panel(pb, 2, top), axis=2)
    assert np.array_equal(changed, a != b)
    # A high score reads as red in a jet-like map, a low one as blue (over the same pixels).
    hot, cold = panel(pb, 2, top).astype(int), panel(pa, 2, top).astype(int)
    region = b > 0.5
    assert (hot[region, 0] - cold[region, 0]).mean() > 50
    assert (cold[region, 2] - hot[region, 2]).mean() > 50


def test_prediction_panel_outlines_the_region_above_threshold(tmp_path):
    image = np.zeros((H, W, 3), np.uint8)
    amap = np.zeros((H, W), np.float32)
    amap[10:30, 12:36] = 0.8
    top = viz.LABEL_HEIGHT + viz.GAP
    png = np.asarray(Image.open(viz.save_overlay(tmp_path / "o.png", image, amap, threshold=0.5,
                                                 panel_size=None)).convert("RGB"))
    red = np.all(panel(png, 3, top) == viz.CONTOUR_COLOR, axis=2)
    assert red[10, 20] and red[29, 20] and red[20, 12] and red[20, 35]  # the region's edge
    assert not red[20, 24] and not red[5, 5]  # neither its inside nor the background
    above = np.asarray(Image.open(viz.save_overlay(tmp_path / "p.png", image, amap, threshold=0.9,
                                                   panel_size=None)).convert("RGB"))
    assert not np.all(panel(above, 3, top) == viz.CONTOUR_COLOR, axis=2).any()


def test_overlay_refuses_a_map_of_another_size(tmp_path, image):
    with pytest.raises(ValueError, match="share"):
        viz.save_overlay(tmp_path / "o.png", image, np.zeros((H + 1, W)))


def test_grid_has_one_cell_per_picture_and_title_strip(tmp_path, image):
    mask = np.zeros((H, W), bool)
    mask[:, : W // 2] = True
    rows = [[image, mask, np.full((H, W), 0.5)], [image]]
    path = viz.save_grid(tmp_path / "g.png", rows, titles=["normal", "mask", "map"], cell_size=32)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[:2] == (viz.LABEL_HEIGHT + 2 * 32 + 3 * viz.GAP, 3 * 32 + 4 * viz.GAP)
    # Second row, second column is empty: background only.
    y0, x0 = viz.LABEL_HEIGHT + viz.GAP + 32 + viz.GAP, viz.GAP + 32 + viz.GAP
    assert np.all(png[y0:y0 + 32, x0:x0 + 32] == viz.BACKGROUND)
    # The mask cell (48 wide scaled to 32, so 40 high becomes 27, centred) is white on its left.
    cell = png[viz.LABEL_HEIGHT + viz.GAP:viz.LABEL_HEIGHT + viz.GAP + 32, x0:x0 + 32]
    assert np.all(cell[16, 2:14] == 255) and np.all(cell[16, 18:30] == 0)


def _ink_runs(strip: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) column runs that hold dark pixels in an RGB strip, end exclusive."""
    ink = (strip.min(axis=2) < 128).any(axis=0)
    edges = np.flatnonzero(np.diff(np.r_[0, ink.astype(int), 0]))
    return list(zip(edges[::2], edges[1::2]))


def test_panel_labels_keep_the_spaces_between_their_words(tmp_path, image):
    # Pillow's default 10 px font drew "No ground truth" with a two-pixel space, read "Noground"
    path = viz.save_overlay(tmp_path / "o.png", image, np.zeros(image.shape[:2], np.float32), panel_size=256)
    picture = np.asarray(Image.open(path).convert("RGB"))
    strip = picture[:viz.LABEL_HEIGHT, 2 * viz.GAP + 256:2 * viz.GAP + 2 * 256]  # "No ground truth"
    runs = _ink_runs(strip)
    gaps = sorted(b[0] - a[1] for a, b in zip(runs, runs[1:]))
    assert len(gaps) >= 2 and gaps[-2] >= 3, f"word gaps of {gaps} px in the label"


def _zlib_level(png: bytes) -> int:
    """FLEVEL of the zlib stream in a PNG's first IDAT chunk: 0 fastest, 1 fast, 2 default, 3 best."""
    at = png.index(b"IDAT") + 4
    return png[at + 1] >> 6


def test_pngs_are_written_at_zlibs_fastest_level_with_the_same_pixels(tmp_path):
    from prn.viz import png_bytes, save_overlay
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    data = png_bytes(picture)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), picture)
    slow = io.BytesIO()
    Image.fromarray(picture).save(slow, format="PNG")  # Pillow's default level, to show the check can tell
    assert _zlib_level(data) == 0 and _zlib_level(slow.getvalue()) == 2
    path = save_overlay(tmp_path / "o.png", picture, rng.random((60, 90)), None, threshold=0.5)
    assert _zlib_level(path.read_bytes()) == 0
