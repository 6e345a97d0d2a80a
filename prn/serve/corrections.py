"""Corrections from the page of ``prn serve``: an operator says a verdict was wrong, and the
image goes to disk in the MVTec layout prn reads, so the next model can learn from it.

Why the server keeps what it scored: a correction must carry the image the model saw and the
score it gave, not what a client claims. So every scored upload is held in memory
(``RecentUploads``, bounded by count and bytes, oldest dropped first) under a random id that
``/predict`` returns; a correction names that id. An id no longer held (the server restarted, or
newer uploads pushed it out) is refused with a message saying to upload the image again.

``CorrectionStore`` writes, under its folder (created at the first correction):

- a good part the model judged defective (a false reject): ``train/good/<name>.png``;
- a defect the model missed: ``test/<kind>/<name>.png`` and its painted mask,
  ``ground_truth/<kind>/<name>_mask.png`` (white = defect, at the image's own size); ``kind``
  defaults to ``missed``;
- one JSON line per correction in ``corrections.jsonl`` (``Correction record`` in
  docs/serve.md): what, who, when, the upload's name and hash, the model's score, threshold and
  verdict at the time, the checkpoint.

``<name>`` is the upload's name reduced to safe characters plus the correction's id, and every
file is created exclusively: nothing is ever overwritten, and no client text becomes a path.
Images are stored as PNG of the decoded RGB pixels, exactly what prn reads back.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from prn.data.io import read_image_bytes
from prn.errors import DataError, PRNError
from prn.viz import png_bytes

KEEP_UPLOADS = 256                # scored uploads held for corrections ...
KEEP_BYTES = 256 * 1024 * 1024    # ... and at most this many of their bytes
RECORDS = "corrections.jsonl"
DEFAULT_KIND = "missed"           # the defect kind of a missed defect, unless the page names one
LABELS = ("good", "defective")
TEXT_MAX_CHARS = 200              # operator, note, user agent: kept short in the record
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class CorrectionError(PRNError):
    """A correction the server refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Scored:
    """One scored upload as the server keeps it until it is corrected or pushed out."""
    id: str
    name: str
    data: bytes
    width: int
    height: int
    model: dict                   # score, normalized_score, prediction, label, threshold, ...
    time: str = field(default_factory=utc_now)
    corrected: str | None = None  # the id of its correction, once saved


class RecentUploads:
    """The last scored uploads, by id, bounded by ``max_items`` and ``max_bytes`` (oldest out)."""

    def __init__(self, max_items: int = KEEP_UPLOADS, max_bytes: int = KEEP_BYTES):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, Scored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, scored: Scored) -> None:
        if len(scored.data) > self.max_bytes:
            return  # too large to hold: its id is refused later, like a pushed-out one
        with self._lock:
            self._items[scored.id] = scored
            self._bytes += len(scored.data)
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)

    def get(self, result_id: str) -> Scored:
        with self._lock:
            scored = self._items.get(result_id)
        if scored is None:
            raise CorrectionError(
                f"result {result_id!r} is no longer held by the server (it keeps the last "
                f"{self.max_items} scored images, up to {self.max_bytes // 2**20} MB, until it "
                f"restarts or reloads its model); upload the image again and correct the new result", 410)
        return scored

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def new_id() -> str:
    return secrets.token_hex(8)


def safe_stem(name: str) -> str:
    """A client's file name as a file stem: its last part without extension, other characters
    than letters, digits, ``_`` and ``-`` replaced, at most 60 characters; ``image`` if nothing is
    left. Never a path: no separators, no dots."""
    stem = re.split(r"[/\\]", name)[-1].rsplit(".", 1)[0]
    stem = _UNSAFE.sub("_", stem).strip("_-")[:60]
    return stem or "image"


def clean_text(value: str | None, what: str) -> str | None:
    """Free text a client sends for the record (operator, note): printable, at most
    TEXT_MAX_CHARS characters, or refused."""
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if len(value) > TEXT_MAX_CHARS:
        raise CorrectionError(f"{what} is {len(value)} characters long; at most {TEXT_MAX_CHARS}")
    if not value.isprintable():
        raise CorrectionError(f"{what} holds control characters")
    return value


def check_label_and_kind(label: str | None, kind: str | None) -> tuple[str, str | None]:
    if label not in LABELS:
        raise CorrectionError(f"field 'label' must be 'good' or 'defective', got {label!r}")
    if label == "good":
        if kind not in (None, "", "good"):
            raise CorrectionError(f"a good part has no defect kind, got kind {kind!r}")
        return label, None
    kind = kind or DEFAULT_KIND
    if not _KIND.match(kind) or kind == "good":
        raise CorrectionError(f"kind {kind!r} must be 1-40 lower-case letters, digits, '_' or '-', "
                              f"starting with a letter or digit, and not 'good'")
    return label, kind


def read_mask_upload(data: bytes, hw: tuple[int, int], max_pixels: int) -> np.ndarray:
    """bool (H, W) at the image's size from a painted mask (PNG, white = defect, transparent =
    none). The page paints at most 2048 px on the longer side, so a mask of the image's aspect
    but smaller is scaled up (nearest neighbour); any other size is refused."""
    rgb = read_image_bytes(data, "field 'mask'", max_pixels, limit_name="the image's size")
    mask = rgb.max(axis=2) > 127
    (h, w), (mh, mw) = hw, mask.shape
    if (mh, mw) != (h, w):
        # the page's canvas: the image scaled by one factor and rounded to whole pixels
        if mw > w or mh > h or abs(mw / w - mh / h) > 1 / mw + 1 / mh:
            raise CorrectionError(f"field 'mask': the mask is {mw}x{mh} (WxH) but the image is "
                                  f"{w}x{h}; send it at the image's size or its aspect")
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    if not mask.any():
        raise CorrectionError("field 'mask': nothing is painted; paint the defect (white) before saving")
    return mask


def model_description(predictor) -> dict:
    """What every correction record says of the model that erred (a ``Predictor``)."""
    return {"checkpoint": str(predictor.loaded.path.resolve()), "model_kind": predictor.loaded.kind,
            "pixel_threshold": predictor.pixel_threshold}


class CorrectionStore:
    """The corrections folder: files in the MVTec layout and ``corrections.jsonl``. ``model``
    is what every record says of the model (checkpoint, kind, pixel threshold)."""

    def __init__(self, folder: str | Path, model: dict):
        self.folder, self.model = Path(folder), model
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder}: the corrections folder is a file")
        self._lock = threading.Lock()

    @property
    def records_path(self) -> Path:
        return self.folder / RECORDS

    def save(self, scored: Scored, label: str, *, mask_png: bytes | None = None,
             kind: str | None = None, who: dict, page: dict | None = None, note: str | None = None,
             max_pixels: int = 50_000_000) -> dict:
        """Store one correction of ``scored``; returns its record. Refused (CorrectionError) for
        an unknown label or kind, a defect without a painted mask, a good part with one, and a
        result already corrected."""
        label, kind = check_label_and_kind(label, kind)
        self._check_not_corrected(scored)
        image = read_image_bytes(scored.data, f"result {scored.id!r}", None)
        mask = None
        if label == "defective":
            if mask_png is None:
                raise CorrectionError("a missed defect needs its painted mask (field 'mask', PNG, white = defect)")
            mask = read_mask_upload(mask_png, image.shape[:2], max_pixels)
        elif mask_png is not None:
            raise CorrectionError("a good part has no defect to paint: send no field 'mask' with label 'good'")
        with self._lock:
            self._check_not_corrected(scored)  # again, under the lock: two saves of one result
            correction_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{new_id()[:6]}"
            stem = f"{safe_stem(scored.name)}-{correction_id}"
            sub = Path("train", "good") if label == "good" else Path("test", kind)
            files = [(sub / f"{stem}.png", png_bytes(image))]
            if mask is not None:
                files.append((Path("ground_truth", kind, f"{stem}_mask.png"), png_bytes(mask.astype(np.uint8) * 255)))
            self._write_new(files)
            record = {
                "id": correction_id, "time": utc_now(), "label": label, "kind": kind,
                "image": files[0][0].as_posix(), "mask": files[1][0].as_posix() if mask is not None else None,
                "mask_pixels": None if mask is None else int(mask.sum()),
                "width": scored.width, "height": scored.height,
                "upload": {"name": scored.name, "bytes": len(scored.data),
                           "sha256": hashlib.sha256(scored.data).hexdigest(), "result": scored.id,
                           "scored_at": scored.time},
                "model": {**scored.model, **self.model},
                "page": page or {}, "who": who, "note": note,
            }
            with self.records_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            scored.corrected = correction_id
        return record

    @staticmethod
    def _check_not_corrected(scored: Scored) -> None:
        if scored.corrected:
            raise CorrectionError(f"result {scored.id!r} ({scored.name!r}) was already corrected "
                                  f"(correction {scored.corrected}); corrections are never overwritten", 409)

    def _write_new(self, files: list[tuple[Path, bytes]]) -> None:
        """Create every file exclusively (never overwriting); on failure remove those made."""
        made = []
        try:
            for rel, data in files:
                path = self.folder / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("xb") as f:
                    made.append(path)
                    f.write(data)
        except OSError as exc:
            for path in made:
                path.unlink(missing_ok=True)
            raise PRNError(f"{self.folder}: cannot store the correction ({exc}); start prn serve "
                           f"with --corrections DIR on a writable folder") from exc

    def records(self) -> list[dict]:
        """Every record of corrections.jsonl, oldest first (a line that is not JSON is skipped)."""
        if not self.records_path.is_file():
            return []
        out = []
        for line in self.records_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def write_zip(self, target) -> int:
        """The folder's records and image files into a zip (a path or binary file); returns the
        number of files. Only regular files inside the folder are taken (no links)."""
        n = 0
        with zipfile.ZipFile(target, "w") as zf:
            if self.folder.is_dir():
                for path in sorted(self.folder.rglob("*")):
                    if path.is_symlink() or not path.is_file():
                        continue
                    rel = path.relative_to(self.folder).as_posix()
                    compress = zipfile.ZIP_DEFLATED if path.suffix == ".jsonl" else zipfile.ZIP_STORED
                    zf.write(path, rel, compress_type=compress)
                    n += 1
        return n
