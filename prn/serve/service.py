"""The inspection service without the web: one loaded model, a lock around it, uploads in,
JSON-ready results out. ``prn.serve.app`` puts HTTP in front of it.

Uploads are decoded from memory with the same checks as files (``prn.data.io.read_image_bytes``)
and resized exactly as ``prn predict`` does (``Predictor.prepare``), so a served decision is
the one ``prn predict`` writes to scores.csv for the same file.

    >>> service = InspectionService(Predictor("runs/demo/latest"))
    >>> results = service.inspect([Upload("a.png", png_bytes)], overlay=True)

An upload that cannot be read (empty, not an image, truncated, over the pixel limit) gets
``{"name": ..., "error": "<why>"}`` in its place and the others are scored; only when none can be
read does ``inspect`` raise (the first one's DataError).

Each result lists the image's defect regions (``Postprocess.regions``, boxes in its own pixels;
None without a pixel threshold). With a ``CorrectionStore`` every scored upload is also held in
memory under the result's ``id`` (``prn.serve.corrections``) so that ``correct`` can store it,
with the score it got, when an operator says the verdict was wrong.
"""

from __future__ import annotations

import base64
import json
import platform
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from prn.preprocess import resize_image
from prn.data.io import read_image_bytes
from prn.deploy.calibrate import calibration_messages, named_held_out
from prn.deploy.predict import Predictor
from prn.errors import DataError, PRNError, UsageError
from prn.postprocess import MIN_REGION_AREA, check_min_area, resize_map
from prn.report import json_safe
from prn.runtime import JoinedCalls, ModelThread
from prn.serve.corrections import (CorrectionError, CorrectionStore, RecentUploads, Scored, model_description,
                                   new_id)
from prn.viz import contour_overlay, heat_overlay, panel_shape, png_bytes

OVERLAY_MAX_SIDE = 1024  # overlays are pictures to look at; masks keep the image's own size
NAME_MAX_CHARS = 200     # upload names are echoed back, never used as paths
# what the pixel-limit message names as the limit's source: the serve option by default
PIXEL_LIMIT_OPTION = "--max-pixels"
# the last images scored whose look (prn.deploy.drift) is compared with the calibration's
APPEARANCE_WINDOW = 200


@dataclass(frozen=True)
class Limits:
    """What one request may hold. max_pixels per image (width * height)."""
    max_request_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_images: int = 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"serve limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Upload:
    name: str    # the client's file name: shown in results and messages only
    data: bytes


@dataclass
class _Job:
    """One request's readable images on their way through the model: resized (at ``resizer``'s
    input size) in the request's thread, and whether it asked for pictures and masks."""
    images: list[np.ndarray]
    resized: list[np.ndarray]
    resizer: Predictor
    overlay: bool
    mask: bool


# what a correction's record keeps of the result it corrects
MODEL_FIELDS = ("score", "normalized_score", "prediction", "label", "threshold")


class NotCalibratedError(PRNError):
    """A mask was asked of a model without a pixel threshold."""


def _png_base64(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class InspectionService:
    """The one model of a server and the thread that runs it.

    Decoding, the resize to the model's input, regions and PNG encoding run in the caller's
    thread; everything torch computes (the forward pass, maps resized to the images, heat-map
    pictures) runs in one model thread (``prn.runtime.ModelThread``), which serialises the
    model's use: torch called from many threads ran 1.5-2x slower on the CPU than from one.
    Requests that wait for the model together go through it in one forward pass
    (``prn.runtime.JoinedCalls``), up to the predictor's batch size.
    """

    def __init__(self, predictor: Predictor, limits: Limits = Limits(), *,
                 pixel_limit_source: str = PIXEL_LIMIT_OPTION, min_region_area: int = MIN_REGION_AREA,
                 corrections: CorrectionStore | None = None, recent: RecentUploads | None = None,
                 loader: Callable[[], Predictor] | None = None, model_thread: ModelThread | None = None):
        """``pixel_limit_source`` names where ``limits.max_pixels`` came from in the message of an
        image over it (``prn.serve.build_app`` says whether --max-pixels or the model set it).
        ``min_region_area``: the smallest region listed unless a request asks for another.
        ``corrections``: where corrections go (None: corrections are off and no upload is kept);
        ``recent`` bounds the uploads held for them (default ``RecentUploads()``).
        ``loader``: builds the predictor anew for ``reload`` (None: reloading is refused).
        ``model_thread``: the thread the predictor was loaded in (None: a new one)."""
        self.predictor, self.limits = predictor, limits
        self.pixel_limit_source = pixel_limit_source
        self.min_region_area = check_min_area(min_region_area)
        self.corrections = corrections
        self.recent = None if corrections is None else (recent if recent is not None else RecentUploads())
        self.loader = loader
        self.model_thread = model_thread if model_thread is not None else ModelThread()
        # requests waiting for the model go through it together, a batch's worth at most
        self._joined = JoinedCalls(self.model_thread, self._infer, predictor.batch_size)
        # how many times the model was swapped (``reload``): each /predict answer carries it, so a
        # page open across a swap learns that its threshold and notes are the old model's
        self.generation = 0
        # (brightness, detail) of the last images scored, against the calibration's good images
        self.looks: deque = deque(maxlen=APPEARANCE_WINDOW)
        self._looks_lock = threading.Lock()

    def reload(self) -> dict:
        """Load the model again from where the service was started (e.g. after ``latest`` was
        pointed at a retrained run) and swap it in between two requests. The new model is loaded
        before the swap, so a checkpoint that fails to load leaves the old one serving; requests
        wait while it loads (it loads in the model thread)."""
        if self.loader is None:
            raise UsageError("this service was built without a loader, so it cannot reload its model; restart it")
        before = self.predictor.loaded.path.resolve()

        def swap() -> Predictor:
            predictor = self.loader()
            self.predictor = predictor
            self.generation += 1
            if self.corrections is not None:
                self.corrections.model = model_description(predictor)
            if self.recent is not None:
                self.recent.clear()  # their scores are the old model's: a correction must name the model that erred
            with self._looks_lock:
                self.looks.clear()  # compared with the new calibration from the next image on
            return predictor
        predictor = self.model_thread.run(swap)
        return {"previous_checkpoint": str(before), "checkpoint": str(predictor.loaded.path.resolve()),
                "model": self.model_info()}

    # ------------------------------------------------------------------------- describing

    def model_info(self) -> dict:
        """What is loaded and how it decides: kind, backbone, input size, thresholds, versions,
        the run's test metrics when its run folder is beside the checkpoint."""
        import torch

        import prn
        p = self.predictor
        cal = p.calibration
        run_dir = p.loaded.path.parent.parent if p.loaded.path.parent.name == "checkpoints" else None
        threshold_source = self.threshold_source()
        return json_safe({
            "kind": p.loaded.kind,
            "generation": self.generation,
            "backbone": p.cfg.model.backbone,
            "input_size": list(p.input_hw),
            "checkpoint": p.loaded.path.name,
            "device": str(p.loaded.device),
            "engine": p.engine_name,
            "calibrated": cal is not None,
            "image_threshold": p.threshold,
            "threshold_source": threshold_source,
            "pixel_threshold": p.pixel_threshold,
            "score_range": [cal["score_min"], cal["score_max"]] if cal else None,
            "calibration": cal,
            # what fit and prn calibrate said of the held-out images (a suspect one, the one whose
            # score is the threshold): a person at the line sees it too, and can look at the image
            "calibration_notes": [{"level": level, "text": text} for level, text in
                                  (calibration_messages(cal, run_dir) if threshold_source == "calibration" else [])],
            "held_out_images": self.held_out_images(),
            "metrics": _read_json(run_dir / "results.json") if run_dir else None,
            "versions": {"prn": prn.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "trained_with": _read_json(run_dir / "environment.json") if run_dir else None,
            "limits": asdict(self.limits),
            "min_region_area": self.min_region_area,
            "appearance": {"reference": (cal or {}).get("appearance"), "recent": self.appearance()},
            "corrections": None if self.corrections is None else {
                "folder": str(self.corrections.folder), "count": len(self.corrections.records()),
                "kept_uploads": self.recent.max_items, "kept_megabytes": self.recent.max_bytes // 2**20},
        })

    def threshold_source(self) -> str | None:
        """Where the image threshold comes from: "calibration", "set when the server started", or
        None (no threshold)."""
        p = self.predictor
        if p.threshold is None:
            return None
        return ("calibration" if p.calibration and p.threshold == p.calibration["image_threshold"]
                else "set when the server started")

    def held_out_images(self) -> list[dict]:
        """The held-out good images the calibration names (suspects, then the one whose score is
        the threshold), with their fold index, score and why, for those whose file is readable
        here; none when the server decides with a threshold of its own. The page offers to score
        them; only these files are ever sent (``held_out_file``)."""
        if self.threshold_source() != "calibration":
            return []
        named = named_held_out(self.predictor.calibration)
        return [{"index": n["index"], "name": Path(n["path"]).name, "path": n["path"], "score": n["score"],
                 "why": why} for why, n in named if n.get("path") and Path(n["path"]).is_file()]

    def held_out_file(self, index: int) -> Path:
        """The file of the held-out image ``index`` of the fold, if the calibration names it
        (``held_out_images``); else a DataError: nothing else on disk is served."""
        for image in self.held_out_images():
            if image["index"] == index:
                return Path(image["path"])
        raise DataError(f"held-out image {index} is not one the calibration names (see GET /model's "
                        f"held_out_images), or its file is not readable here")

    def appearance(self) -> dict | None:
        """The last APPEARANCE_WINDOW scored images' brightness and detail against the good images
        the model was calibrated on (``prn.deploy.drift.compare_appearance``): "drifted" and a
        "message" saying what changed; None before enough images or without a reference."""
        with self._looks_lock:
            looks = np.array(self.looks, dtype=np.float64).reshape(-1, 2)
        return json_safe(self.predictor.compare_look(looks, subject="the last {n} images scored"))

    # ------------------------------------------------------------------------- inspecting

    def decode(self, uploads: list[Upload]) -> list[np.ndarray | DataError]:
        """uint8 (h, w, 3) per upload, or the DataError (naming it) of one that cannot be read."""
        images = []
        for i, up in enumerate(uploads, 1):
            label = f"upload {i} ({up.name!r})" if up.name else f"upload {i}"
            try:
                images.append(read_image_bytes(up.data, label, self.limits.max_pixels,
                                               limit_name=self.pixel_limit_source))
            except DataError as exc:
                images.append(exc)
        return images

    def inspect(self, uploads: list[Upload], *, overlay: bool = False, mask: bool = False,
                min_region_area: int | None = None) -> list[dict]:
        """Per upload, in order: name, width, height, score, normalized_score, prediction
        (1 defective), review (1 passed but in the review band, None without a band), label,
        threshold, regions (None without a pixel threshold), milliseconds, and id when corrections
        are on; overlay / mask as base64 PNG when asked. An upload that
        cannot be read: name, error, milliseconds. None readable: DataError."""
        min_area = check_min_area(self.min_region_area if min_region_area is None else min_region_area)
        if mask and self.predictor.pixel_threshold is None:
            raise NotCalibratedError(f"{self.predictor.loaded.path.name}: the model is not calibrated, "
                                     f"so it has no pixel threshold for masks; run `prn calibrate RUN`")
        t0 = time.perf_counter()
        decoded = self.decode(uploads)
        images = [d for d in decoded if not isinstance(d, DataError)]
        if not images:  # nothing to score: the request fails, naming the first upload
            raise next(d for d in decoded if isinstance(d, DataError))
        # resized here, in the request's thread, while the model runs other requests' images
        resizer = self.predictor
        job = _Job(images, [resizer.resize(im) for im in images], resizer, overlay, mask)
        t_decoded = time.perf_counter()
        predictor, raw, pictures = self._joined(job, len(images))
        if predictor is self.predictor:  # not a model swapped out meanwhile, whose reference differs
            with self._looks_lock:
                self.looks.extend((r["brightness"], r["detail"]) for r in raw)
        raw, pictures = iter(raw), iter(pictures)
        model_ms = (time.perf_counter() - t_decoded) * 1000 / len(images)
        decode_ms = (t_decoded - t0) * 1000 / len(uploads)
        results = []
        for up, image in zip(uploads, decoded):
            if isinstance(image, DataError):
                results.append({"name": up.name[:NAME_MAX_CHARS], "error": str(image),
                                "milliseconds": decode_ms})
                continue
            r, picture = next(raw), next(pictures)
            t_pic = time.perf_counter()
            out = {
                "name": up.name[:NAME_MAX_CHARS],
                "width": int(image.shape[1]), "height": int(image.shape[0]),
                "score": r["score"], "normalized_score": r["normalized_score"],
                "prediction": r["prediction"], "review": r["review"],
                "label": None if r["prediction"] is None else ("defective" if r["prediction"] else "good"),
                "threshold": r["threshold"],
            }
            regions = predictor.regions(r["map"], min_area) if r["map"] is not None else []
            out["regions"] = None if regions is None else [g.as_dict() for g in regions]
            if self.recent is not None:
                out = {"id": new_id(), **out}
                self.recent.add(Scored(out["id"], out["name"], up.data, out["width"], out["height"],
                                       json_safe({k: out[k] for k in MODEL_FIELDS})
                                       | {"regions": None if regions is None else len(regions)}))
            if overlay:
                out["overlay"] = _png_base64(picture)
            if mask:
                out["mask"] = _png_base64(predictor.region(r["map"]).astype(np.uint8) * 255)
            # each image's own decode, resize and pictures, and its share of the request's time with
            # the model (its wait and the forward pass, perhaps shared with other requests)
            out["milliseconds"] = decode_ms + model_ms + (time.perf_counter() - t_pic) * 1000
            results.append(json_safe(out))
        return results

    def _infer(self, jobs: list[_Job]) -> list[tuple[Predictor, list[dict], list]]:
        """In the model thread, the requests that waited together in one forward pass
        (``prn.runtime.JoinedCalls``); per request: the predictor used (a reload may swap it
        after), its results with maps at each image's size, and the heat-map pictures when asked
        (else Nones). A map none of whose pixels reaches the pixel threshold is not resized when
        no picture or mask needs it (it can have no region; its "map" is None), as in
        ``prn predict``."""
        predictor = self.predictor
        for job in jobs:
            if job.resizer is not predictor:  # resized for a model swapped out since: its input size may differ
                job.resized = [predictor.resize(im) for im in job.images]
        raw = predictor.predict_arrays([im for job in jobs for im in job.images], full_size=False,
                                       resized=[r for job in jobs for r in job.resized])
        out, start = [], 0
        for job in jobs:
            mine, start = raw[start:start + len(job.images)], start + len(job.images)
            pictures = []
            for image, r in zip(job.images, mine):
                r["map"] = predictor.postprocess.map_for(r["map"], image.shape[:2],
                                                         regions_only=not (job.overlay or job.mask))
                pictures.append(self.overlay(image, r["map"], predictor) if job.overlay else None)
            out.append((predictor, mine, pictures))
        return out

    def overlay(self, image: np.ndarray, amap: np.ndarray, predictor: Predictor | None = None) -> np.ndarray:
        """The heat map blended on the image with the defect region's contour, uint8 (h, w, 3),
        the longer side at most OVERLAY_MAX_SIDE. The contour is the calibrated pixel threshold
        (0.5 of the display map without calibration)."""
        hw = panel_shape(image.shape[:2], min(OVERLAY_MAX_SIDE, max(image.shape[:2])))
        image, amap = resize_image(image, hw), resize_map(amap, hw)
        post = (predictor or self.predictor).postprocess
        return contour_overlay(heat_overlay(image, post.display_map(amap)), post.region(amap))

    # ------------------------------------------------------------------------- correcting

    def correct(self, result_id: str, label: str, **details) -> dict:
        """Store a correction of a result this server scored (``CorrectionStore.save``'s
        details: mask_png, kind, who, page, note); returns its record."""
        if self.corrections is None:
            raise CorrectionError("corrections are off on this server (prn serve --no-corrections)", 404)
        return self.corrections.save(self.recent.get(result_id), label, max_pixels=self.limits.max_pixels,
                                     **details)
