"""Safe image and mask reading with PIL.

Every problem with a file (missing, empty, truncated, not an image, too large) raises
`prn.errors.DataError` whose message starts with the file's path; no exception escapes from
inside PIL. Truncated files are refused: `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is left False
and each image is fully decoded with `.load()`.

Conversions done by `read_image` (result: uint8 (H, W, 3) RGB):
- grayscale (1, L), palette (P), CMYK, YCbCr, LAB, HSV: PIL's own conversion to RGB;
- 16-bit (I;16*, or I holding 16-bit data): scaled by the file's bit depth, value * 255 / 65535,
  so a 12-bit-in-16 image stays dark rather than being clipped to white;
- transparency (RGBA, LA, PA, palette with a transparent colour): composited on black, so fully
  transparent pixels are black whatever colour they store.

    >>> img = read_image("bottle/test/broken_large/000.png")       # uint8 (900, 900, 3)
    >>> mask = read_mask("bottle/ground_truth/broken_large/000_mask.png", img.shape[:2])
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from prn.config import DataConfig
from prn.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = DataConfig.max_image_pixels


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is one of IMAGE_EXTENSIONS."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files in ``folder`` (at any depth, or directly in it), sorted so a seed picks the
    same file everywhere; [] when the folder is absent or holds none. A link to an image that is
    gone is listed too, so that reading it names it (an image the line meant to send, not a file
    to pass over in silence)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image_file(p) and (p.is_file() or is_broken_link(p)))


def is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def require_images(folder: Path, what: str = "folder", recursive: bool = True) -> list[Path]:
    """Like find_images, but a missing folder or one without images raises DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} not found (or not a folder)")
    files = find_images(folder, recursive)
    if not files:
        raise DataError(f"{folder}: {what} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _open(path: Path | str, max_pixels: int | None, data: bytes | None = None,
          limit_name: str = "max_image_pixels") -> Image.Image:
    """Open lazily (header only) after checking the file exists, is not empty and is not too big.

    With ``data``, the image is those bytes (an upload) and ``path`` only names it in messages;
    ``limit_name`` says in the message what set ``max_pixels``."""
    if data is None:
        if not path.is_file():
            if is_broken_link(path):
                raise DataError(f"{path}: a link to {os.readlink(path)}, which does not exist")
            raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
    elif len(data) == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its two bomb limits; we want a hard stop there too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path if data is None else io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image too large, refused as a possible decompression bomb "
                        f"({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not an image file PIL can read") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error... for broken headers
        raise DataError(f"{path}: cannot read image header ({type(exc).__name__}: {exc})") from exc
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise DataError(f"{path}: image is {w}x{h} = {w * h} pixels, more than the limit of "
                        f"{max_pixels} ({limit_name})")
    return img


def decode_image(path: Path | str, max_pixels: int | None, data: bytes | None = None,
                 limit_name: str = "max_image_pixels") -> Image.Image:
    """The file (or ``data``, an upload named ``path``) opened with the checks of ``_open`` and fully
    decoded, in whatever mode it has; the caller closes it (``with decode_image(...) as img``).
    Anything wrong with the data raises DataError naming it."""
    img = _open(path, max_pixels, data, limit_name)
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, zlib errors...
        img.close()
        raise DataError(f"{path}: cannot decode image, the file is truncated or corrupt "
                        f"({type(exc).__name__}: {exc})") from exc
    return img


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the file header only, without decoding pixels."""
    path = Path(path)
    with _open(path, None) as img:
        return img.height, img.width


def _bit_depth(path: Path, img: Image.Image) -> int:
    if img.mode.startswith("I;16"):
        return 16
    tag = getattr(img, "tag_v2", None)  # TIFF: BitsPerSample
    bits = tag.get(258) if tag is not None else None
    if isinstance(bits, tuple):
        bits = bits[0]
    if bits is None and img.format == "PNG":
        bits = 16  # PIL opens 16-bit grayscale PNG as mode I in some versions
    if bits not in (8, 16):
        raise DataError(f"{path}: {img.mode} images of {bits or 'unknown'} bits per pixel are not "
                        "supported; save it as 8- or 16-bit")
    return bits


def _high_bit_values(path: Path, img: Image.Image) -> tuple[np.ndarray, int]:
    """Integer pixel values (H, W) of an I/I;16 image and the largest value its bit depth allows."""
    top = 2 ** _bit_depth(path, img) - 1
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > top):
        raise DataError(f"{path}: pixel values span {values.min()}..{values.max()}, outside "
                        f"0..{top} of its bit depth")
    return values, top


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(path: Path, img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) from an already decoded image of any supported mode."""
    if img.mode.startswith("I"):
        values, top = _high_bit_values(path, img)
        gray = np.rint(values * (255.0 / top)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise DataError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Exception as exc:  # unusual modes PIL cannot convert
        raise DataError(f"{path}: cannot convert {img.mode} image to RGB ({exc})") from exc


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any supported image as uint8 (H, W, 3) RGB; see the module docstring for conversions."""
    path = Path(path)
    with decode_image(path, max_pixels) as img:
        return to_rgb(path, img)


def read_image_bytes(data: bytes, name: str = "upload",
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, *,
                     limit_name: str = "max_image_pixels") -> np.ndarray:
    """``read_image`` for an image held in memory (an upload): the same checks and conversions,
    decoded from ``data`` without touching the disk; ``name`` only labels error messages and
    ``limit_name`` names what set ``max_pixels`` (``prn serve``: its ``--max-pixels``)."""
    with decode_image(name, max_pixels, bytes(data), limit_name) as img:
        return to_rgb(name, img)


def _mask_values(path: Path, img: Image.Image) -> tuple[np.ndarray, int]:
    """Pixel values, (H, W) or (H, W, 3), and the largest value the file format allows."""
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8), 1
    if img.mode.startswith("I"):
        return _high_bit_values(path, img)
    if img.mode == "L":
        return np.asarray(img), 255
    return to_rgb(path, img), 255


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS, *,
              image_path: str | Path | None = None) -> np.ndarray:
    """Read a defect mask as bool (H, W).

    A pixel is defective when any channel exceeds half of the largest value the file's bit depth
    allows (127.5 for 8-bit, 32767.5 for 16-bit), so JPEG noise and anti-aliased borders are
    binarised. A mask whose values are all 0 or 1 is a 0/1 mask: every non-zero pixel is defective.
    expected_hw: (height, width) of the image the mask belongs to; a different size raises
    DataError (image_path, if given, is named in the message).
    """
    path = Path(path)
    with decode_image(path, max_pixels) as img:
        values, top = _mask_values(path, img)
    if values.size and values.max() <= 1:
        mask = values > 0
    else:
        mask = values > top / 2
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        owner = f"its image {image_path}" if image_path is not None else "its image"
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but {owner} is "
                        f"{expected_hw[1]}x{expected_hw[0]}")
    return mask
