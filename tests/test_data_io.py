"""prn.data.io (safe image/mask reading) and prn.data.datasets (resizing, torch Dataset)."""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prn.data.datasets import ImageDataset, load_sample, original_hw
from prn.data.io import find_images, image_hw, read_image, read_image_bytes, read_mask
from prn.data.sample import Sample
from prn.errors import DataError


def _save(array, path, **kw):
    Image.fromarray(array).save(path, **kw)
    return path


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels but whose data stops after a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\0" * 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
    return path


def _rng_image(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- read_image: conversions -------------------------------------------------------------------

def test_grayscale_image_becomes_three_equal_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    out = read_image(_save(gray, tmp_path / "g.png"))
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgb_png_is_read_unchanged(tmp_path):
    rgb = _rng_image()
    np.testing.assert_array_equal(read_image(_save(rgb, tmp_path / "c.png")), rgb)


def test_16_bit_image_is_scaled_by_bit_depth_not_clipped(tmp_path):
    values = np.array([[0, 257, 4095, 32768, 65535]], dtype=np.uint16)
    path = _save(values, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    # v * 255 / 65535 by hand: 0, 1, 15.93 -> 16, 127.5 -> 128, 255 (clipping would give 255s).
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 16, 128, 255])


def test_16_bit_tiff_is_scaled_like_16_bit_png(tmp_path):
    values = np.array([[0, 65535, 32768]], dtype=np.uint16)
    out = read_image(_save(values, tmp_path / "deep.tif"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 255, 128])


def test_32_bit_integer_image_is_refused_with_its_path(tmp_path):
    path = _save(np.full((4, 4), 70000, dtype=np.int32), tmp_path / "wide.tif")
    with pytest.raises(DataError, match="bits per pixel") as err:
        read_image(path)
    assert str(err.value).startswith(str(path))


def test_palette_image_takes_its_palette_colours(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 250, 10, 20, 5, 200, 90] + [0] * 759)
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0],
                                  [[0, 0, 0], [250, 10, 20], [5, 200, 90]])


def test_transparent_pixels_are_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], dtype=np.uint8)
    out = read_image(_save(rgba, tmp_path / "a.png")).astype(int)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_allclose(out[0, 1], [200 * 128 / 255, 100 * 128 / 255, 50 * 128 / 255], atol=1)
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_gray_with_alpha_is_composited_on_black(tmp_path):
    Image.new("LA", (2, 1)).save(tmp_path / "la.png")
    img = Image.open(tmp_path / "la.png").copy()
    img.putpixel((0, 0), (200, 255))
    img.putpixel((1, 0), (200, 0))
    img.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0], [[200, 200, 200], [0, 0, 0]])


def test_cmyk_image_is_converted_to_rgb(tmp_path):
    img = Image.new("CMYK", (3, 1))
    for x, cmyk in enumerate([(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)]):
        img.putpixel((x, 0), cmyk)
    img.save(tmp_path / "cmyk.tif")
    # White, black and pure cyan by the definition of CMYK.
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tif")[0],
                                  [[255, 255, 255], [0, 0, 0], [0, 255, 255]])


# --- read_image: refusals ----------------------------------------------------------------------

def _refused(path, match, **kw):
    with pytest.raises(DataError, match=match) as err:
        read_image(path, **kw)
    assert str(err.value).startswith(str(path))


def test_missing_file_is_refused_with_its_path(tmp_path):
    _refused(tmp_path / "nope.png", "not found")


def test_a_link_to_a_missing_image_is_listed_and_refused_with_both_names(tmp_path):
    _save(_rng_image(16, 16), tmp_path / "kept.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "away.png")
    (tmp_path / "folder.png").mkdir()  # not a file: passed over, as before
    assert find_images(tmp_path) == [tmp_path / "gone.png", tmp_path / "kept.png"]
    _refused(tmp_path / "gone.png", "a link to")
    with pytest.raises(DataError, match="moved/away.png, which does not exist"):
        read_image(tmp_path / "gone.png")


def test_zero_byte_file_is_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "empty file")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_file_is_refused_not_silently_padded(tmp_path, fmt):
    path = _save(_rng_image(64, 64), tmp_path / f"full.{fmt}")
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _refused(cut, "truncated or corrupt")


def test_text_file_with_image_extension_is_refused(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n" * 10)
    _refused(tmp_path / "notes.png", "not an image")


def test_too_large_image_is_refused_from_its_header_before_decoding(tmp_path):
    # The data is truncated: decoding would fail with "truncated", so "limit" proves the header check.
    path = _png_header_only(tmp_path / "big.png", 3000, 3000)
    _refused(path, "more than the limit of 1000000", max_pixels=1_000_000)


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns at 10k^2, errors at 20k^2
def test_decompression_bomb_becomes_data_error_without_warning(tmp_path, side):
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _refused(path, "decompression bomb", max_pixels=None)


def test_image_hw_reads_only_the_header(tmp_path):
    path = _png_header_only(tmp_path / "big.png", 700, 300)  # undecodable body
    assert image_hw(path) == (300, 700)


# --- read_mask ---------------------------------------------------------------------------------

def _blob(h=12, w=10):
    mask = np.zeros((h, w), dtype=bool)
    mask[3:7, 2:5] = True
    mask[9, 8] = True
    return mask


@pytest.mark.parametrize("encode", [
    lambda m: m.astype(np.uint8) * 255,          # 8-bit 0/255 (MVTec)
    lambda m: m.astype(np.uint8),                # 8-bit 0/1
    lambda m: m.astype(np.uint16) * 65535,       # 16-bit 0/65535
    lambda m: m.astype(np.uint16),               # 16-bit 0/1
    lambda m: m,                                 # 1-bit
], ids=["u8_255", "u8_1", "u16_65535", "u16_1", "bilevel"])
def test_mask_encodings_read_back_as_the_same_bool_mask(tmp_path, encode):
    mask = _blob()
    out = read_mask(_save(encode(mask), tmp_path / "m.png"))
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, mask)


def test_rgb_mask_is_defective_where_any_channel_is_set(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 255, 0)
    rgb[2, 2] = (0, 0, 255)
    expected = np.zeros((4, 4), dtype=bool)
    expected[[0, 1, 2], [0, 1, 2]] = True
    np.testing.assert_array_equal(read_mask(_save(rgb, tmp_path / "m.png")), expected)


def test_palette_mask_is_defective_where_its_colour_is_bright(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putdata([0, 1, 0])
    img.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png")[0], [False, True, False])


@pytest.mark.parametrize("dtype,values,expected", [
    (np.uint8, [0, 2, 127, 128, 255], [0, 0, 0, 1, 1]),
    (np.uint16, [0, 2, 32767, 32768, 65535], [0, 0, 0, 1, 1]),
])
def test_intermediate_values_are_binarised_at_half_the_maximum(tmp_path, dtype, values, expected):
    out = read_mask(_save(np.array([values], dtype=dtype), tmp_path / "m.png"))
    np.testing.assert_array_equal(out[0], np.array(expected, dtype=bool))


def test_jpeg_compressed_mask_is_recovered(tmp_path):
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:40, 20:50] = True
    path = _save(mask.astype(np.uint8) * 255, tmp_path / "m.jpg", quality=60)
    assert len(np.unique(np.asarray(Image.open(path)))) > 2  # really has artefacts
    out = read_mask(path)
    iou = (out & mask).sum() / (out | mask).sum()
    assert iou > 0.97


def test_mask_of_other_size_names_both_files_and_sizes(tmp_path):
    path = _save(_blob(12, 10).astype(np.uint8) * 255, tmp_path / "m.png")
    with pytest.raises(DataError) as err:
        read_mask(path, expected_hw=(12, 11), image_path=tmp_path / "img.png")
    msg = str(err.value)
    assert msg.startswith(str(path)) and str(tmp_path / "img.png") in msg
    assert "10x12" in msg and "11x12" in msg


def test_corrupt_mask_is_refused_with_its_path(tmp_path):
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as err:
        read_mask(tmp_path / "m.png")
    assert str(err.value).startswith(str(tmp_path / "m.png"))


# --- datasets ----------------------------------------------------------------------------------

def test_load_sample_resizes_like_an_antialiased_bilinear_filter(tmp_path):
    rgb = _rng_image(64, 96, seed=1)
    sample = Sample(_save(rgb, tmp_path / "i.png"), None, 0, "good")
    image, mask = load_sample(sample, 32)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert mask.dtype == np.bool_ and mask.shape == (32, 32) and not mask.any()
    ref = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=(32, 32),
                        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(image.astype(float) - ref).max() <= 2
    # Without antialiasing, noise would survive the 2-3x shrink: the std would stay near 74.
    assert image.astype(float).std() < 45


def test_load_sample_shrinks_masks_by_nearest_neighbour(tmp_path):
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 8:12] = True
    sample = Sample(_save(np.zeros((16, 16, 3), np.uint8), tmp_path / "i.png"),
                    _save(mask.astype(np.uint8) * 255, tmp_path / "i_mask.png"), 1, "crack")
    _, small = load_sample(sample, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:4, 4:6] = True
    np.testing.assert_array_equal(small, expected)


def test_load_sample_refuses_a_mask_of_another_size(tmp_path):
    sample = Sample(_save(np.zeros((16, 16, 3), np.uint8), tmp_path / "i.png"),
                    _save(np.zeros((16, 15), np.uint8), tmp_path / "i_mask.png"), 1, "crack")
    with pytest.raises(DataError, match="15x16"):
        load_sample(sample, 8)


def test_image_dataset_yields_model_ready_tensors(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:] = (0, 51, 255)
    mask = np.zeros((20, 30), np.uint8)
    mask[:, :15] = 255
    samples = [Sample(_save(rgb, tmp_path / "a.png"), None, 0, "good"),
               Sample(_save(rgb, tmp_path / "b.png"), _save(mask, tmp_path / "b_mask.png"), 1, "cut")]
    ds = ImageDataset(samples, 32)
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert type(item["image"]) is torch.Tensor
    for c, value in enumerate((0.0, 0.2, 1.0)):
        torch.testing.assert_close(item["image"][c], torch.full((32, 32), value))
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 32, 32)
    assert item["mask"][0, :, :16].eq(1).all() and item["mask"][0, :, 16:].eq(0).all()
    assert item["label"] == 1 and item["index"] == 1
    assert ds[0]["label"] == 0 and ds[0]["mask"].sum() == 0


def test_original_hw_is_height_then_width(tmp_path):
    sample = Sample(_save(np.zeros((20, 30, 3), np.uint8), tmp_path / "i.png"), None, 0, "good")
    assert original_hw(sample) == (20, 30)


# --- read_image_bytes: uploads, decoded from memory --------------------------------------------

def test_read_image_bytes_decodes_every_mode_as_read_image_does(tmp_path):
    g = np.random.default_rng(5)
    arrays = {"rgb.png": _rng_image(), "gray.png": _rng_image()[..., 0],
              "rgba.png": g.integers(0, 256, (9, 11, 4), dtype=np.uint8),
              "deep.png": g.integers(0, 65536, (7, 5), dtype=np.uint16), "photo.jpg": _rng_image()}
    for name, array in arrays.items():
        path = _save(array, tmp_path / name)
        np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), name), read_image(path))


@pytest.mark.parametrize("data, problem", [
    (b"", "empty file"),
    (b"plain text", "not an image"),
])
def test_read_image_bytes_names_the_upload_and_the_problem(data, problem):
    with pytest.raises(DataError, match=f"^upload 3 \\('a.png'\\): {problem}"):
        read_image_bytes(data, "upload 3 ('a.png')")


def test_read_image_bytes_refuses_truncated_and_too_large_images(tmp_path):
    whole = _save(_rng_image(64, 64), tmp_path / "w.png").read_bytes()
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_image_bytes(whole[:len(whole) // 2], "cut.png")
    header_only = _png_header_only(tmp_path / "big.png", 3000, 3000).read_bytes()
    with pytest.raises(DataError, match="^big.png: image is 3000x3000 = 9000000 pixels"):
        read_image_bytes(header_only, "big.png", max_pixels=1_000_000)
