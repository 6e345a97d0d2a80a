"""The supervised few-shot protocol of the paper (Appendix A.2, after DRA).

k "seen" anomalies are drawn from the TEST anomalies, moved into training and removed from the
test set. They are spread across defect types: the types are visited round-robin in a seeded
random order, and each visit takes a random not-yet-taken image of that type (a type with no
images left is skipped). So with k >= number of types every type is represented, and per-type
counts differ by at most one until a type runs out.

DAGM (``dagm=True`` or an index named "dagm"): its original training set holds anomalies too;
they are first moved into the test set, then the k seen anomalies are drawn as above. Other
datasets whose training folders hold anomalies (KSDD2) keep the MVTec setting: those training
anomalies are neither trained on nor tested, and are kept in ``Split.excluded``.

    >>> split = few_shot_split(load_index(cfg), k=10, seed=0)
    >>> split.summary()["train_anomalous"]
    10
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from prn.data.sample import DatasetIndex, Sample
from prn.errors import DataError


LISTS = ("train_normal", "train_anomalous", "val_normal", "val_anomalous", "test", "excluded", "copies",
         "not_good")


@dataclass
class Split:
    """Training and test samples of one few-shot run.

    train_normal: defect-free training images. train_anomalous: the k seen anomalies (with masks).
    test: every remaining test image. excluded: training anomalies the protocol does not use.
    copies: images of the dataset whose bytes another of its images has (``drop_copies``), left out.
    val_normal, val_anomalous: the held-out fold of the training data (``hold_out_validation``):
    taken out of train_normal and train_anomalous, never trained on; it validates each epoch
    and calibrates thresholds. Test images are never in it. not_good: held-out good images a person
    judged not good (``prn calibrate RUN --not-good IMAGE``), taken out of val_normal: nothing
    calibrates on them any more, nothing trains or tests on them.
    """

    train_normal: list[Sample]
    train_anomalous: list[Sample]
    test: list[Sample]
    dataset: str
    category: str
    k: int
    seed: int
    root: str = ""
    excluded: list[Sample] = field(default_factory=list)
    val_normal: list[Sample] = field(default_factory=list)
    val_anomalous: list[Sample] = field(default_factory=list)
    copies: list[Sample] = field(default_factory=list)
    not_good: list[Sample] = field(default_factory=list)

    @property
    def val(self) -> list[Sample]:
        return self.val_normal + self.val_anomalous

    def summary(self) -> dict:
        """Counts: train_normal, train_anomalous, test_normal, test_anomalous, excluded, and
        seen_defect_types {type: count}, with dataset/category/k/seed."""
        return {
            "dataset": self.dataset, "category": self.category, "k": self.k, "seed": self.seed,
            "train_normal": len(self.train_normal),
            "train_anomalous": len(self.train_anomalous),
            "test_normal": sum(s.label == 0 for s in self.test),
            "test_anomalous": sum(s.label == 1 for s in self.test),
            "excluded": len(self.excluded),
            "copies": len(self.copies),
            "val_normal": len(self.val_normal),
            "val_anomalous": len(self.val_anomalous),
            "not_good": len(self.not_good),
            "seen_defect_types": dict(sorted(Counter(s.defect_type
                                                     for s in self.train_anomalous).items())),
        }

    def to_dict(self) -> dict:
        out = {"dataset": self.dataset, "category": self.category, "k": self.k,
               "seed": self.seed, "root": self.root}
        for name in LISTS:
            out[name] = [s.to_dict() for s in getattr(self, name)]
        return out

    def save(self, path: str | Path) -> None:
        """Write the split as JSON (absolute paths as strings), through a temporary file renamed over
        ``path``: ``prn calibrate --not-good`` rewrites a run's split, and a kill then must leave the
        old file or the new one, never half of one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    def rerooted(self, root: str | Path) -> Split:
        """The split with every file under its data set's folder (``self.root``, as the fit found
        it) moved under ``root``: a data set copied or moved since the fit. Files elsewhere (images
        added by a retrain) keep their paths. DataError when ``root`` is not a folder or the split
        records no folder of its own."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: --root is not a folder")
        if not self.root:
            raise DataError("the run's split.json records no data set folder, so its files cannot be moved "
                            "under --root")
        old = Path(self.root)

        def moved(path: Path | None) -> Path | None:
            if path is None:
                return None
            try:
                return root / Path(path).relative_to(old)
            except ValueError:  # not under the data set's folder
                return path

        lists = {name: [replace(s, image_path=moved(s.image_path), mask_path=moved(s.mask_path))
                        for s in getattr(self, name)] for name in LISTS}
        return replace(self, **lists, root=str(root))

    @staticmethod
    def missing(samples: list[Sample]) -> list[Path]:
        """The image files of ``samples`` that are gone (a data set moved, or files deleted)."""
        return [s.image_path for s in samples if not Path(s.image_path).is_file()]

    @staticmethod
    def not_found(missing: list[Path]) -> str:
        """The start of a message on ``missing`` (non-empty): the first file and how many more."""
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{missing[0]}: not found{more}"

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        """The inverse of ``to_dict`` (KeyError, TypeError or ValueError on a malformed dict)."""
        lists = {name: [Sample.from_dict(s) for s in d.get(name, [])]
                 for name in LISTS}
        return cls(**lists, dataset=str(d["dataset"]), category=str(d["category"]),
                   k=int(d["k"]), seed=int(d["seed"]), root=str(d.get("root", "")))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except OSError as exc:
            raise DataError(f"{path}: cannot read split file ({exc})") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a valid split file ({type(exc).__name__}: {exc})") from exc


def _round_robin(anomalies: list[Sample], k: int, rng: np.random.Generator) -> list[int]:
    """Indices into anomalies of k picks spread over defect types (see the module docstring)."""
    types = sorted({s.defect_type for s in anomalies})
    pools = []
    for t in types:
        members = [i for i, s in enumerate(anomalies) if s.defect_type == t]
        pools.append([members[j] for j in rng.permutation(len(members))])
    order = rng.permutation(len(types))
    picked: list[int] = []
    while len(picked) < k:
        for t in order:
            if pools[t] and len(picked) < k:
                picked.append(pools[t].pop())
    return picked


def few_shot_split(index: DatasetIndex, k: int, seed: int, dagm: bool = False) -> Split:
    """Move k test anomalies, spread across defect types, into training (seeded)."""
    train, test = list(index.train), list(index.test)
    excluded = [s for s in train if s.label == 1]
    if dagm or index.name == "dagm":
        test, excluded = test + excluded, []
    anomalies = [s for s in test if s.label == 1]
    if k < 0:
        raise DataError(f"{index.root}: the number of seen anomalies must be >= 0, got {k}")
    if k > len(anomalies):
        raise DataError(f"{index.root}: asked for {k} seen anomalies but only {len(anomalies)} "
                        "anomalous test images exist")
    picked = set(_round_robin(anomalies, k, np.random.default_rng(seed)))
    seen = [s for i, s in enumerate(anomalies) if i in picked]
    seen_set = set(seen)
    return Split(
        train_normal=[s for s in train if s.label == 0],
        train_anomalous=seen,
        test=[s for s in test if s not in seen_set],
        dataset=index.name, category=index.category, k=k, seed=seed,
        root=str(index.root), excluded=excluded,
    )


def hold_out_validation(split: Split, n_anomalies: int, normal_fraction: float, normal_min: int,
                        seed: int) -> Split:
    """Move a seeded share of the training data into the validation fold.

    n_anomalies seen anomalies (spread across defect types like the seen ones) and
    max(normal_min, round(normal_fraction * N)) normal images, the latter only when at least
    twice as many normal images remain for training (a tiny set keeps all for training; a
    fraction of 0 holds none out). The test set is untouched.
    """
    if n_anomalies < 0:
        raise DataError(f"{split.root}: the number of validation anomalies must be >= 0, got {n_anomalies}")
    if n_anomalies and n_anomalies >= len(split.train_anomalous):
        raise DataError(f"{split.root}: {n_anomalies} of the {len(split.train_anomalous)} seen anomalies "
                        "would be held out for validation, leaving none to train on; lower val_anomalies")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    picked = set(_round_robin(split.train_anomalous, n_anomalies, rng)) if n_anomalies else set()
    n = len(split.train_normal)
    n_val = max(normal_min, round(normal_fraction * n)) if normal_fraction > 0 else 0
    if n_val and n - n_val < max(n_val, 1):
        n_val = 0
    val_idx = set(rng.permutation(n)[:n_val].tolist())
    return Split(
        train_normal=[s for i, s in enumerate(split.train_normal) if i not in val_idx],
        train_anomalous=[s for i, s in enumerate(split.train_anomalous) if i not in picked],
        test=list(split.test), dataset=split.dataset, category=split.category, k=split.k,
        seed=split.seed, root=split.root, excluded=list(split.excluded), copies=list(split.copies),
        val_normal=[s for i, s in enumerate(split.train_normal) if i in val_idx],
        val_anomalous=[s for i, s in enumerate(split.train_anomalous) if i in picked],
    )


def drop_copies(samples: list[Sample]) -> tuple[list[Sample], list[tuple[Sample, Sample]]]:
    """Every image file counts once. Where files hold the same bytes (a dataset that stores a
    picture twice under two names: KolektorSDD as shipped here has 16 such pairs), the first of
    ``samples`` is kept and the others are left out; else a test defect can be a copy of a trained
    one (caught because it was learnt) and held-out good images copies of trained ones (a threshold
    fitted on images the model has seen). Returns the kept samples in their order and the (copy,
    kept) pairs. Cheap on large sets: a file is read only when another has its size, and read
    whole only when another also has its first 64 KiB (uncompressed formats share sizes)."""
    sizes = [_size(s.image_path) for s in samples]
    size_counts = Counter(sizes)
    heads = {i: (size, _digest(samples[i].image_path, HEAD_BYTES)) for i, size in enumerate(sizes)
             if size is not None and size_counts[size] > 1}  # by position: one file listed twice is a copy too
    head_counts = Counter(heads.values())
    first: dict[str, Sample] = {}
    kept: list[Sample] = []
    pairs: list[tuple[Sample, Sample]] = []
    for i, s in enumerate(samples):
        if i in heads and head_counts[heads[i]] > 1:
            digest = _digest(s.image_path)
            if digest in first:
                pairs.append((s, first[digest]))
                continue
            first[digest] = s
        kept.append(s)
    return kept, pairs


HEAD_BYTES = 1 << 16


def _digest(path: Path, limit: int = -1) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # a missing file is reported where it is read
        return None
