"""A copy of an image set with every photo inverted, mirrored, enlarged, brightened, darkened or
blurred: the same defects, files, splits and masks, seen as a line with other defects, another
camera, another fixture or other light would.

- ``--invert``: each channel 255 - value. Both development sets' defects are darker than their
  surface, so the pre-process's filter before the resize (``resize_detail``) was chosen on
  ``dark`` alone; inverted, the same defects are bright, and ``bright`` can be measured against
  no filter where ``dark`` was.
- ``--mirror lr|ud|both``: left-right, upside down, or both (a half turn), masks with their photos.
  Whether a model trained on the set scores mirrored good parts as it scores the parts
  themselves says whether mirroring is a symmetry of the line's parts (so that mirrored copies
  could serve as training images) or shows it parts it never sees.
- ``--scale F`` (an integer): every photo F times as wide and high (bicubic), its mask with it
  (nearest, so it stays binary and covers the same defect). A camera of F times the resolution
  on the same parts: at the same input size the resize's step is F times larger, and the
  filter's width rule (``prn.preprocess.detail_width``: the odd number beside the step) gives a
  wider filter, which these copies measure against the narrow one.
- ``--brightness F``: every value times F (Pillow's ``ImageEnhance.Brightness``, clipped at 255);
  ``--blur S``: a Gaussian blur of S pixels of the photo; ``--reencode``: nothing changed but the
  encoding (``--quality``), the copy the others are compared with. The light and the focus of a
  line drift; ``benchmarks/line_drift.py`` asks whether a run's threshold holds when they do.

    python benchmarks/transformed_set.py ../shared/data/kolektorsdd /tmp/kolektorsdd_inverted --invert
    python benchmarks/transformed_set.py ../shared/data/bsdata /tmp/bsdata_x2 --scale 2
    prn fit --dataset mvtec --root /tmp/bsdata_x2 --preset cpu [--set detail_width=3] --test
    python benchmarks/transformed_set.py ../shared/data/bsdata/test/good /tmp/goods_lr --mirror lr
    prn predict RUN /tmp/goods_lr --out /tmp/goods_lr_scores --maps none

Images outside ``ground_truth`` (any folder layout) are transformed and written under the same
name; masks are copied as they are, or mirrored and enlarged with their photos; every other file
is copied. JPEG files are written again at ``--quality`` (a second lossy encoding, the same for
every variant fitted on the copy); other formats losslessly. Nothing here is part of the package:
it makes data for a benchmark.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from prn.data.io import DEFAULT_MAX_PIXELS, decode_image, is_image_file
from prn.errors import DataError

MASKS = "ground_truth"
MODES = ("L", "RGB")  # what ImageOps.invert takes and the sets here hold
MIRRORS = {"lr": Image.Transpose.FLIP_LEFT_RIGHT, "ud": Image.Transpose.FLIP_TOP_BOTTOM,
           "both": Image.Transpose.ROTATE_180}


def decoded(path: Path, photo: bool) -> Image.Image:
    try:  # the package's checked decode: a missing, empty, huge or corrupt file is named
        im = decode_image(path, DEFAULT_MAX_PIXELS)
    except DataError as err:
        raise SystemExit(str(err)) from err
    if photo and im.mode not in MODES:
        im.close()
        raise SystemExit(f"{path}: image mode {im.mode}; only {', '.join(MODES)} are transformed here")
    return im


def placed(im: Image.Image, mirror: str, scale: int, resample: Image.Resampling) -> Image.Image:
    """``im`` mirrored, then enlarged: the geometry photos and masks share."""
    if mirror != "none":
        im = im.transpose(MIRRORS[mirror])
    return im if scale == 1 else im.resize((im.width * scale, im.height * scale), resample)


def lit(im: Image.Image, invert: bool, brightness: float, blur: float) -> Image.Image:
    """``im`` inverted, its values times ``brightness`` and blurred by ``blur`` pixels, as asked:
    what a photo's light and focus change, its mask does not."""
    if invert:
        im = ImageOps.invert(im)
    if brightness != 1:
        im = ImageEnhance.Brightness(im).enhance(brightness)
    return im.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else im


def transform_tree(src: Path, dst: Path, invert: bool = False, scale: int = 1, quality: int = 95,
                   mirror: str = "none", brightness: float = 1.0, blur: float = 0.0,
                   reencode: bool = False) -> dict:
    """Write the transformed copy of ``src`` to ``dst`` (which must not exist or be empty); with
    ``reencode`` a copy with no change but the photos' encoding is allowed. Returns
    {"transformed": photos, "masks": masks mirrored or enlarged, "copied": other files}."""
    if not src.is_dir():
        raise SystemExit(f"{src}: not a folder")
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; give a new folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"{dst}: inside {src}; give a folder outside it")
    if mirror not in ("none", *MIRRORS):
        raise SystemExit(f"--mirror {mirror}: give none, {', '.join(MIRRORS)}")
    moved = scale > 1 or mirror != "none"  # masks follow their photos
    if brightness <= 0 or blur < 0:
        raise SystemExit(f"brightness {brightness}, blur {blur}: give a brightness over 0 and a blur of 0 or more")
    if not (invert or moved or brightness != 1 or blur > 0 or reencode):
        raise SystemExit("nothing to do: give --invert, --mirror, --scale F (F >= 2), --brightness F, "
                         "--blur S or --reencode")
    counts = {"transformed": 0, "masks": 0, "copied": 0}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        out = dst / rel
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        mask = MASKS in rel.parts
        if not is_image_file(path) or (mask and not moved):
            shutil.copy2(path, out)
            counts["copied"] += 1
            continue
        jpeg = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        with decoded(path, photo=not mask) as im:
            if mask:
                placed(im, mirror, scale, Image.Resampling.NEAREST).save(out, **jpeg)
                counts["masks"] += 1
                continue
            im = placed(lit(im, invert, brightness, blur), mirror, scale, Image.Resampling.BICUBIC)
            im.save(out, **jpeg)
        counts["transformed"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the set's root (for example an MVTec category)")
    ap.add_argument("dst", type=Path, help="a new folder for the copy")
    ap.add_argument("--invert", action="store_true", help="each channel 255 - value")
    ap.add_argument("--mirror", default="none", choices=("none", *MIRRORS), help="mirror photos and masks")
    ap.add_argument("--scale", type=int, default=1, help="enlarge photos and masks this many times (integer)")
    ap.add_argument("--brightness", type=float, default=1.0, help="every value times F (clipped)")
    ap.add_argument("--blur", type=float, default=0.0, help="a Gaussian blur of S pixels")
    ap.add_argument("--reencode", action="store_true", help="no change but the encoding (--quality)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the rewritten photos")
    args = ap.parse_args(argv)
    if not 1 <= args.quality <= 100:
        raise SystemExit(f"--quality {args.quality}: give 1 to 100")
    if not 1 <= args.scale <= 8:
        raise SystemExit(f"--scale {args.scale}: give 1 to 8")
    counts = transform_tree(args.src, args.dst, args.invert, args.scale, args.quality, args.mirror,
                            args.brightness, args.blur, args.reencode)
    print(f"{args.dst}: {counts['transformed']} images transformed, {counts['masks']} masks moved, "
          f"{counts['copied']} other files copied", file=sys.stderr)


if __name__ == "__main__":
    main()
