"""The common sample record that every dataset layout produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, whatever its layout.

    label: 0 defect-free, 1 defective. defect_type: "good" for defect-free images, else the
    defect's name (the sub-folder in MVTec AD, "ko" in BTAD, "defect" elsewhere).
    mask_path: None for defect-free images (their mask is all zeros) and for defects known by
    their label alone. annotation: what the mask says of a defective image (ANNOTATIONS): "mask",
    its pixels; "box", a region that holds the defect, loosely (its unmarked part may be good);
    "label", nothing beyond the image being defective (no mask file). added: the image came into
    the run with a retrain (``prn fit --from``), an operator's correction.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    defect_type: str
    annotation: str = "mask"
    added: bool = False

    @property
    def pixel_exact(self) -> bool:
        """Whether the mask gives every pixel's truth (good images, and defects with a mask)."""
        return self.label == 0 or self.annotation == "mask"

    def to_dict(self) -> dict:
        out = {
            "image": str(self.image_path),
            "mask": None if self.mask_path is None else str(self.mask_path),
            "label": self.label,
            "defect_type": self.defect_type,
        }
        if self.annotation != "mask":
            out["annotation"] = self.annotation
        if self.added:
            out["added"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(Path(d["image"]), None if d.get("mask") is None else Path(d["mask"]),
                   int(d["label"]), str(d["defect_type"]), str(d.get("annotation", "mask")),
                   bool(d.get("added", False)))


ANNOTATIONS = ("mask", "box", "label")


@dataclass
class DatasetIndex:
    """The samples of one category as the dataset ships them, before the few-shot split.

    train: the original training images (defect-free; DAGM's also hold defective ones).
    test: the original test images, defect-free and defective.
    root: the category folder, so outputs can mirror paths relative to it.
    """

    name: str
    category: str
    root: Path
    train: list[Sample]
    test: list[Sample]
