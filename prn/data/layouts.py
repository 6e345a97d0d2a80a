"""Dataset layouts on disk -> `DatasetIndex` of `Sample` records.

Supported layouts (`PRNConfig.dataset`):

- ``mvtec`` / ``demo``: ``CAT/train/good/*``, ``CAT/test/<defect>/*`` (``good`` = defect-free),
  ``CAT/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>_box.png``, a loose box around the
  defect; or, with ``allow_label_only``, no file: a defect known by its label alone).
- ``btad``: ``NN/train/ok/*``, ``NN/test/ok|ko/*``, ``NN/ground_truth/ko/<stem>.png``.
- ``dagm``: ``ClassN/Train|Test/*.PNG`` with ``Label/Labels.txt`` and ``Label/<stem>_label.PNG``.
- ``ksdd2``: ``ROOT/train|test/<stem>.png`` with ``<stem>_GT.png``; an all-zero GT is defect-free.
- ``folder``: ``ROOT/<normal_dir>``, ``ROOT/<abnormal_dir>``, ``ROOT/<mask_dir>/<stem><mask_suffix>.*``
  (or ``<stem>_box.*``, or nothing with ``allow_label_only``).

For the layouts with categories, ``root`` may also point at a category folder itself (one with
``train/`` or ``Train/`` inside); ``category`` may then be "". The index is checked from file
headers only (no pixel decoding, except KSDD2's GT masks, whose content decides the label):
missing or empty folders, defective images without a mask, masks without an image and masks whose
size differs from their image's raise `DataError`. Train and test samples are sorted by image
path, so an index is deterministic.
"""

from __future__ import annotations

import re
from operator import attrgetter
from pathlib import Path

import numpy as np

from prn.config import PRNConfig
from prn.data.io import DEFAULT_MAX_PIXELS, find_images, image_hw, read_mask, require_images
from prn.data.sample import DatasetIndex, Sample
from prn.errors import DataError

_TRAIN_DIR = {"mvtec": "train", "demo": "train", "btad": "train", "dagm": "Train"}


# --- helpers ----------------------------------------------------------------------------------

def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise DataError(f"{f}: has the same name as {out[f.stem]} apart from the extension; "
                            "images and masks cannot be paired unambiguously")
        out[f.stem] = f
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _child(folder: Path, name: str) -> Path:
    """folder/name, matching name case-insensitively when the exact spelling is absent."""
    exact = folder / name
    if exact.exists() or not folder.is_dir():
        return exact
    for p in folder.iterdir():
        if p.name.lower() == name.lower():
            return p
    return exact


def _check_size(image: Path, mask: Path) -> None:
    ih, iw = image_hw(image)
    mh, mw = image_hw(mask)
    if (ih, iw) != (mh, mw):
        raise DataError(f"{mask}: mask is {mw}x{mh} (WxH) but its image {image} is {iw}x{ih}")


BOX_SUFFIX = "_box"  # <stem>_box.png beside <stem>_mask.png: a loose region that holds the defect


def _pair_masks(images: list[Path], mask_dir: Path, suffix: str, defect_type: str,
                loose: bool = False, label_only: bool = False) -> list[Sample]:
    """Defective samples: image x.ext gets mask_dir/x<suffix>.<any image ext>, or with ``loose``
    a box mask mask_dir/x_box.<ext> (annotation "box"); without either the image is an error,
    or with ``label_only`` a defect known by its label alone (annotation "label")."""
    _by_stem(images)
    masks = _by_stem(find_images(mask_dir, recursive=False)) if mask_dir.is_dir() or not label_only else {}
    samples = []
    for img in images:
        mask, annotation = masks.pop(img.stem + suffix, None), "mask"
        box = masks.pop(img.stem + BOX_SUFFIX, None) if loose and suffix != BOX_SUFFIX else None
        if mask is None and box is not None:
            mask, annotation = box, "box"
        if mask is None:
            if label_only:
                samples.append(Sample(img, None, 1, defect_type, "label"))
                continue
            raise DataError(f"{img}: defective image has no mask (expected "
                            f"{mask_dir / (img.stem + suffix)}.png"
                            + (f" or a box {mask_dir / (img.stem + BOX_SUFFIX)}.png, or set "
                               f"allow_label_only for defects known by their label alone)" if loose else ")"))
        _check_size(img, mask)
        samples.append(Sample(img, mask, 1, defect_type, annotation))
    if masks:
        stem, mask = min(masks.items())
        if not stem.endswith(suffix):
            raise DataError(f"{mask}: not named like a mask (<image name>{suffix}.png)")
        raise DataError(f"{mask}: mask has no matching image (expected "
                        f"{images[0].parent / stem[: len(stem) - len(suffix)]}.*)")
    return samples


def _normals(folder: Path) -> list[Sample]:
    return [Sample(p, None, 0, "good") for p in require_images(folder, recursive=False)]


def _is_category(folder: Path, dataset: str) -> bool:
    return _child(folder, _TRAIN_DIR[dataset]).is_dir()


def list_categories(dataset: str, root: str | Path) -> list[str]:
    """Sorted category names under root (folders holding train/ or Train/).

    Empty for datasets without categories (ksdd2, folder) and when root is itself a category.
    """
    root = Path(root)
    if dataset not in _TRAIN_DIR:
        return []
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    if _is_category(root, dataset):
        return []
    return [p.name for p in _subdirs(root) if _is_category(p, dataset)]


def _category_dir(cfg: PRNConfig, root: Path) -> tuple[Path, str]:
    if _is_category(root, cfg.data.dataset) and (not cfg.data.category or root.name == cfg.data.category):
        return root, cfg.data.category or root.name
    category = cfg.data.category or ("demo" if cfg.data.dataset == "demo" else "")
    if category and _is_category(root / category, cfg.data.dataset):
        return root / category, category
    if _is_category(root, cfg.data.dataset):
        raise DataError(f"{root}: is itself a category folder ({root.name}), but category "
                        f"{category!r} was asked for")
    found = list_categories(cfg.data.dataset, root)
    what = f"category {category!r} not found" if category else "no category given"
    raise DataError(f"{root}: {what} for dataset {cfg.data.dataset!r}; available: "
                    f"{', '.join(found) if found else 'none'}")


# --- layouts ----------------------------------------------------------------------------------

def _mvtec(cat: Path, label_only: bool = False) -> tuple[list[Sample], list[Sample]]:
    train_dir, test_dir, gt_dir = cat / "train", cat / "test", cat / "ground_truth"
    for extra in _subdirs(train_dir):
        if extra.name != "good":
            raise DataError(f"{extra}: unexpected folder; training images go in train/good")
    train = _normals(train_dir / "good")
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found")
    test: list[Sample] = []
    defect_dirs = _subdirs(test_dir)
    if not defect_dirs:
        raise DataError(f"{test_dir}: no sub-folders (expected test/good and test/<defect>)")
    for d in defect_dirs:
        if d.name == "good":
            test += _normals(d)
        else:
            test += _pair_masks(require_images(d, recursive=False), gt_dir / d.name, "_mask", d.name,
                                loose=True, label_only=label_only)
    tested = {d.name for d in defect_dirs}
    if gt_dir.is_dir():
        for g in _subdirs(gt_dir):
            # Masks of a defect type with no test images: a misnamed or missing test folder.
            orphans = find_images(g, recursive=False) if g.name not in ("good", *tested) else []
            if orphans:
                raise DataError(f"{orphans[0]}: mask has no matching image (no folder {test_dir / g.name})")
    return train, test


def _btad(cat: Path) -> tuple[list[Sample], list[Sample]]:
    train = _normals(cat / "train" / "ok")
    test_dir = cat / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found")
    for extra in _subdirs(test_dir):
        if extra.name not in ("ok", "ko"):
            raise DataError(f"{extra}: unexpected folder; BTAD test images go in test/ok and test/ko")
    test = _normals(test_dir / "ok") if (test_dir / "ok").is_dir() else []
    if (test_dir / "ko").is_dir():
        # BTAD masks keep the image's stem, as .png even for .bmp images (category 03).
        defective = require_images(test_dir / "ko", recursive=False)
        test += _pair_masks(defective, cat / "ground_truth" / "ko", "", "ko")
    if not test:
        raise DataError(f"{test_dir}: no test/ok or test/ko images")
    return train, test


_LABEL_LINE = re.compile(r"\s+")


def _read_dagm_labels(labels: Path) -> dict[str, tuple[int, str | None]]:
    """Labels.txt -> {image file name: (label, label image name or None)}.

    Format: a first line with the number of entries, then per image
    ``id  label(0/1)  image.PNG  0  [image_label.PNG]`` separated by tabs or spaces.
    """
    try:
        lines = labels.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"{labels}: cannot read ({exc})") from exc
    out: dict[str, tuple[int, str | None]] = {}
    for number, line in enumerate(lines, start=1):
        tokens = _LABEL_LINE.split(line.strip())
        if len(tokens) < 3:
            continue  # the count line, blank lines
        if tokens[1] not in ("0", "1"):
            raise DataError(f"{labels}: line {number}: label must be 0 or 1, found {tokens[1]!r}")
        label = int(tokens[1])
        mask = tokens[4] if label == 1 and len(tokens) >= 5 else None
        out[tokens[2]] = (label, mask)
    if not out:
        raise DataError(f"{labels}: no entries found (expected lines 'id label image 0 label_image')")
    return out


def _dagm_split(folder: Path) -> list[Sample]:
    images = require_images(folder, recursive=False)
    label_dir = _child(folder, "Label")
    labels_txt = _child(label_dir, "Labels.txt")
    masks = find_images(label_dir, recursive=False)
    by_name, by_stem = {m.name: m for m in masks}, _by_stem(masks)
    if labels_txt.is_file():
        table = _read_dagm_labels(labels_txt)
    else:  # no Labels.txt: an image is defective when its NNNN_label file exists
        stems = {m.stem for m in masks}
        table = {p.name: ((1, None) if f"{p.stem}_label" in stems else (0, None)) for p in images}
    samples, used = [], set()
    for img in images:
        if img.name not in table:
            raise DataError(f"{img}: image is not listed in {labels_txt}")
        label, mask_name = table[img.name]
        if label == 0:
            samples.append(Sample(img, None, 0, "good"))
            continue
        mask = by_name.get(mask_name) if mask_name else None
        if mask is None:  # the name in Labels.txt is absent or differs in case/extension
            mask = by_stem.get(f"{img.stem}_label")
        if mask is None:
            raise DataError(f"{img}: defective image has no mask (expected "
                            f"{mask_name or img.stem + '_label.PNG'} in {label_dir})")
        _check_size(img, mask)
        used.add(mask)
        samples.append(Sample(img, mask, 1, "defect"))
    listed = {p.name for p in images}
    for name in sorted(table):
        if name not in listed:
            raise DataError(f"{folder / name}: listed in {labels_txt} but the file is missing")
    for mask in masks:
        if mask not in used:
            raise DataError(f"{mask}: mask has no matching defective image in {folder}")
    return samples


def _dagm(cat: Path) -> tuple[list[Sample], list[Sample]]:
    return _dagm_split(_child(cat, "Train")), _dagm_split(_child(cat, "Test"))


def _ksdd2_split(folder: Path, max_pixels: int) -> list[Sample]:
    files = require_images(folder, recursive=False)
    gts = _by_stem([p for p in files if p.stem.endswith("_GT")])
    images = [p for p in files if not p.stem.endswith("_GT")]
    if not images:
        raise DataError(f"{folder}: folder holds masks (_GT) but no images")
    samples = []
    for img in images:
        gt = gts.pop(f"{img.stem}_GT", None)
        if gt is None:
            raise DataError(f"{img}: image has no ground-truth mask (expected {img.stem}_GT.png)")
        # KSDD2 ships a GT for every image; the defect-free ones are all zero.
        if read_mask(gt, image_hw(img), max_pixels, image_path=img).any():
            samples.append(Sample(img, gt, 1, "defect"))
        else:
            samples.append(Sample(img, None, 0, "good"))
    if gts:
        raise DataError(f"{next(iter(gts.values()))}: mask has no matching image")
    return samples


def _ksdd2(root: Path, max_pixels: int) -> tuple[list[Sample], list[Sample]]:
    return _ksdd2_split(root / "train", max_pixels), _ksdd2_split(root / "test", max_pixels)


def _folder(cfg: PRNConfig, root: Path) -> tuple[list[Sample], list[Sample]]:
    normal_dir = root / cfg.data.normal_dir
    normals = _normals(normal_dir)
    defects = _pair_masks(require_images(root / cfg.data.abnormal_dir, recursive=False), root / cfg.data.mask_dir,
                          cfg.data.mask_suffix, "defect", loose=True, label_only=cfg.data.allow_label_only)
    if cfg.data.test_normal_dir:
        return normals, _normals(root / cfg.data.test_normal_dir) + defects
    if not 0 <= cfg.data.test_normal_fraction < 1:
        raise DataError(f"{normal_dir}: test_normal_fraction must be in [0, 1), "
                        f"got {cfg.data.test_normal_fraction}")
    n_test = round(cfg.data.test_normal_fraction * len(normals))
    if cfg.data.test_normal_fraction > 0:
        n_test = min(max(n_test, 1), len(normals) - 1)
    if len(normals) - n_test < 1:
        raise DataError(f"{normal_dir}: needs at least 2 images to hold some out for testing")
    rng = np.random.default_rng(cfg.data.split_seed)
    held = set(rng.choice(len(normals), n_test, replace=False).tolist())
    train = [s for i, s in enumerate(normals) if i not in held]
    test = [s for i, s in enumerate(normals) if i in held]
    return train, test + defects


def load_index(cfg: PRNConfig) -> DatasetIndex:
    """Index the images of cfg.data.dataset / cfg.data.root / cfg.data.category (and the folder options)."""
    if not cfg.data.root:
        raise DataError("root: no dataset root given (set root / --root to the dataset folder)")
    root = Path(cfg.data.root).expanduser().absolute()  # absolute sample paths; symlinks kept
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    if cfg.data.dataset in _TRAIN_DIR:
        cat, category = _category_dir(cfg, root)
        if cfg.data.dataset in ("mvtec", "demo"):
            train, test = _mvtec(cat, label_only=cfg.data.allow_label_only)
        else:
            train, test = {"btad": _btad, "dagm": _dagm}[cfg.data.dataset](cat)
    elif cfg.data.dataset == "ksdd2":
        cat, category = root, cfg.data.category
        train, test = _ksdd2(root, cfg.data.max_image_pixels or DEFAULT_MAX_PIXELS)
    elif cfg.data.dataset == "folder":
        cat, category = root, cfg.data.category
        train, test = _folder(cfg, root)
    else:
        raise DataError(f"{root}: unknown dataset layout {cfg.data.dataset!r}")
    by_path = attrgetter("image_path")
    return DatasetIndex(cfg.data.dataset, category, cat, sorted(train, key=by_path),
                        sorted(test, key=by_path))


def added_images(folder: str | Path, *, normals: bool) -> list[Sample]:
    """Images to add to a run (``prn fit --from RUN --add-anomalies/--add-normals``), e.g. the
    operator's corrections of ``prn serve``. Defective ones come from ``folder/test/<kind>/`` with
    ``ground_truth/<kind>/<stem>_mask.png`` (or ``_box.png``, or nothing: a label alone); good ones
    from ``folder/train/good/``, or from ``folder`` itself when it has no such sub-folder."""
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of images to add not found")
    if normals:
        good = folder / "train" / "good"
        return _normals(good if good.is_dir() else folder)
    test = folder / "test"
    kinds = [d for d in _subdirs(test) if d.name != "good"] if test.is_dir() else []
    if not kinds:
        raise DataError(f"{folder}: no defective images to add (expected {test}/<kind>/ with masks in "
                        f"{folder / 'ground_truth'}/<kind>/<stem>_mask.png, as prn serve's corrections are)")
    out = []
    for d in kinds:
        out += _pair_masks(require_images(d, recursive=False), folder / "ground_truth" / d.name, "_mask",
                           d.name, loose=True, label_only=True)
    return sorted(out, key=attrgetter("image_path"))
