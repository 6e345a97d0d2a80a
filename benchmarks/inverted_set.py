"""A copy of an image set with every photo's gray levels inverted: bright defects on a dark surface.

Both development sets' defects are darker than their surface, so the pre-process's filter before
the resize (``resize_detail``) was chosen on ``dark`` alone; ``auto`` picks ``bright`` for a line
whose seen defects are brighter. Inverting every photo (255 - value, each channel) turns the same
defects bright, with the same files, splits and masks, so ``bright`` can be measured against no
filter where ``dark`` was:

    python benchmarks/inverted_set.py ../shared/data/kolektorsdd /tmp/kolektorsdd_inverted
    prn fit --dataset mvtec --root /tmp/kolektorsdd_inverted --preset cpu [--set resize_detail=off] --test

Images outside ``ground_truth`` (any folder layout) are inverted and written under the same name;
masks and every other file are copied as they are. JPEG files are written again at ``--quality``
(a second lossy encoding, the same for every variant fitted on the copy); other formats
losslessly. Nothing here is part of the package: it makes data for a benchmark.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import ImageOps

from prn.data.io import DEFAULT_MAX_PIXELS, decode_image, is_image_file
from prn.errors import DataError

MASKS = "ground_truth"
MODES = ("L", "RGB")  # what ImageOps.invert takes and the sets here hold


def invert_tree(src: Path, dst: Path, quality: int = 95) -> dict:
    """Write the inverted copy of ``src`` to ``dst`` (which must not exist or be empty). Returns
    {"inverted": n, "copied": n}."""
    if not src.is_dir():
        raise SystemExit(f"{src}: not a folder")
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; give a new folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"{dst}: inside {src}; give a folder outside it")
    counts = {"inverted": 0, "copied": 0}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        out = dst / rel
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if MASKS in rel.parts or not is_image_file(path):
            shutil.copy2(path, out)
            counts["copied"] += 1
            continue
        try:  # the package's checked decode: a missing, empty, huge or corrupt file is named
            im = decode_image(path, DEFAULT_MAX_PIXELS)
        except DataError as err:
            raise SystemExit(str(err)) from err
        with im:
            if im.mode not in MODES:
                raise SystemExit(f"{path}: image mode {im.mode}; only {', '.join(MODES)} are inverted here")
            jpeg = path.suffix.lower() in (".jpg", ".jpeg")
            ImageOps.invert(im).save(out, **({"quality": quality} if jpeg else {}))
        counts["inverted"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the set's root (for example an MVTec category)")
    ap.add_argument("dst", type=Path, help="a new folder for the inverted copy")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the rewritten photos")
    args = ap.parse_args(argv)
    if not 1 <= args.quality <= 100:
        raise SystemExit(f"--quality {args.quality}: give 1 to 100")
    counts = invert_tree(args.src, args.dst, args.quality)
    print(f"{args.dst}: {counts['inverted']} images inverted, {counts['copied']} other files copied",
          file=sys.stderr)


if __name__ == "__main__":
    main()
