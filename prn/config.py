"""The one configuration object of prn.

Every default is the paper's (Zhang et al., CVPR 2023, Sections 3-4 and Appendix A) unless its
comment says otherwise. The CLI and the Python API both build a `PRNConfig`; every run writes it
to `config.yaml` in its run folder, so a result can be reproduced from that file alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# MVTec AD's object/texture split: it decides where target areas may lie (Sec. 3.4).
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
    "toothbrush", "transistor", "zipper",
)

MAP_SIGMAS = (0.0, 2.0, 4.0, 8.0)  # what select_map_sigma chooses from

DATASETS = ("mvtec", "btad", "dagm", "ksdd2", "folder", "demo")
BACKBONES = ("resnet18", "tf_efficientnet_lite0")
PRECISIONS = ("32", "bf16", "16")  # prn.precision
CALIBRATION_TAILS = ("gumbel", "normal")  # prn.deploy.calibrate.image_threshold


@dataclass
class PRNConfig:
    # --- data (Sec. 4.1, A.2) ---
    dataset: str = "mvtec"            # one of DATASETS
    root: str = ""                    # dataset root (the folder holding the categories)
    category: str = ""                # sub-dataset, e.g. "bottle", "Class1", "01"; "" for ksdd2/folder
    category_kind: str = "auto"       # "object", "texture" or "auto" (MVTec's split; others: texture)
    image_size: int = 256             # images are resized to image_size x image_size (see image_hw)
    image_hw: tuple[int, int] = (0, 0)  # ours: explicit input height, width (multiples of 32); (0, 0): square
    keep_aspect: bool = False         # ours: fit sets image_hw from the training images' aspect, long side image_size
    seen_anomalies: int = 10          # k in {0, 1, 5, 10}: anomalies moved from test to train
    split_seed: int = 0               # seed of the few-shot sampling
    # generic folder layout (dataset="folder")
    normal_dir: str = "good"          # relative to root: defect-free images for training
    abnormal_dir: str = "defect"      # relative to root: defective images
    mask_dir: str = "masks"           # relative to root: masks of the defective images
    mask_suffix: str = "_mask"        # mask of "x.png" is "<mask_dir>/x<mask_suffix>.png"
    test_normal_dir: str = ""         # optional: defect-free test images (else a share of normal_dir)
    test_normal_fraction: float = 0.2 # share of normal_dir held out for testing when test_normal_dir=""
    max_image_pixels: int = 50_000_000  # larger images are refused (decompression-bomb guard)
    # held-out fold of the training data (ours): never trained on, never used for prototypes;
    # it validates every epoch on real defects and calibrates thresholds. Listed in split.json.
    val_anomalies: int = -1           # seen anomalies held out; -1: floor(0.3 k) (3 of 10, 1 of 5, 0 of 1)
    val_normal_fraction: float = 0.1  # share of the normal training images held out ...
    val_normal_min: int = 8           # ... but at least this many (when there are twice as many)

    # --- network (Sec. 3.1-3.3) ---
    backbone: str = "resnet18"        # one of BACKBONES; tf_efficientnet_lite0 works offline
    backbone_weights: str = "imagenet"  # "imagenet", "random", or a path to a state-dict file
    prototype_ratio: float = 0.1      # K = ceil(ratio * number of normal training images)
    kmeans_max_iter: int = 300
    use_prototypes: bool = True       # MP (Table 4)
    use_attention: bool = True        # MSA (Table 4)
    use_fusion: bool = True           # MF (Table 4)
    attention_layers: int = 3         # N stacked MSA blocks
    attention_patch_divisors: tuple[int, ...] = (1, 2, 4, 8)  # patch sizes h, h/2, h/4, h/8
    attention_dim: int = 8            # embedding width of q/k/v per head; 0: 2c/heads (ours: 8, see docs/model.md)
    attention_scale: str = "sqrt"     # softmax scale: "sqrt" 1/sqrt(c^s) (ours); "paper" 1/c^s (Eq. 3)
    decoder_channels: tuple[int, ...] = (128, 64, 16, 8)  # U-Net decoder widths at 1/8..1/1 (ours: lean)
    residual_prior: bool = False      # ours: add the standardised residual map |F - P*| to the logits, with
                                      # a learned weight, so training corrects the prototype map

    # --- anomaly generation (Sec. 3.4, A.1) ---
    extended_anomalies: bool = True   # EA
    heterologous_anomalies: bool = True  # HEA
    homologous_anomalies: bool = True    # HOA
    target_areas: bool = True         # TA
    target_size: tuple[float, float] = (0.25, 0.75)  # target area extent, share of the shorter side
    texture_dir: str = ""             # DTD-like folder for HEA; "" -> built-in procedural textures
    beta_min: float = 0.0             # opacity beta ~ U(beta_min, beta_max) (DRAEM's range)
    beta_max: float = 0.8
    perlin_threshold: float = 0.5
    homologous_grid: int = 8          # HOA: 8x8 grid shuffle
    aug1_ops: int = 2                 # colour operations drawn per anomaly (Fig. 5: two) ...
    aug1_prob: float = 1.0            # ... each applied with this probability (ours: < 1 keeps some as they look)
    aug2_max_angle: float = 90.0      # EA rotation range, degrees (the paper gives none)
    ea_clip_to_target: bool = True    # EA mask clipped to the target area; False keeps the defect whole
    gray_textures: str = "auto"       # HEA textures in gray: "auto" (when the normal images are), "yes", "no"
    perlin_min_scale: int = 0         # Perlin lattice cells per side 2^min .. 2^(max-1) (DRAEM: 0, 6); low = large blobs
    perlin_max_scale: int = 6

    # --- training (Sec. 3.5, 4.1) ---
    epochs: int = 700
    batch_size: int = 64              # split 2:1:1 into normal / extended / simulated
    seen_fraction: float = 0.0        # ours: share of each batch that is the real seen anomalies, mildly
                                      # augmented; taken from the extended and simulated slots
    steps_per_epoch: int = 0          # 0: one pass over the normal images
    lr: float = 1e-4
    weight_decay: float = 1e-2
    optimizer: str = "adam"           # "adam" (the paper's, decay coupled to the gradient) or "adamw"
                                      # (ours: decoupled decay, none on norm and bias parameters)
    lr_schedule: str = "constant"     # "constant" (the paper's) or "cosine" (ours), counted in steps
    warmup_fraction: float = 0.0      # share of all steps spent warming the learning rate up linearly
    output_bias_prior: float = 0.0    # ours: start the output layer at logit(p) (0: PyTorch's default)
    focal_alpha: float = 0.5
    focal_gamma: float = 4.0
    focal_weight: float = 5.0         # lambda in Eq. 5
    grad_clip: float = 1.0            # max grad norm; 0 disables (ours, for stability)
    seed: int = 0
    num_workers: int = -1             # DataLoader workers generating anomalies (0: in the main process;
                                      # -1: sized from the device, prn.train.loader_workers)
    device: str = "auto"              # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
    precision: str = "32"             # ours: "32", "bf16" (autocast) or "16" (autocast, loss scaling; CUDA)
    checkpoint_every: int = 1         # epochs between checkpoints
    select_epoch: str = "last"        # "last", or "best": the epoch with the best validation score
                                      # (pixel AP + image AUROC on the held-out fold, never test data)

    # --- inference (Sec. 3.5) ---
    top_k: int = 100                  # image score: mean of the top-k pixels of the map
    map_sigma: float = 0.0            # ours: Gaussian smoothing of the map (px at the input size) before
                                      # the image score and the pixel metrics; 0: none (the paper's)
    select_map_sigma: bool = False    # ours: after training, set map_sigma to the one of MAP_SIGMAS that
                                      # scores best on the validation fold (kept as is without a fold)
    eval_batch_size: int = 16
    # --- decisions (ours; prn.deploy.calibrate): set on the held-out normal fold, never on test data ---
    target_fpr: float = 0.01          # image threshold: this share of good parts is rejected
    pixel_target_fpr: float = 0.001   # pixel threshold (masks, contours): this share of good pixels is marked
    calibration_tail: str = "gumbel"  # with too few held-out images for a quantile: "gumbel" or "normal" fit

    # --- PatchCore baseline (prn/baselines; Roth et al. 2022) ---
    patchcore_coreset_ratio: float = 0.1
    patchcore_num_neighbors: int = 9
    patchcore_max_bank: int = 100_000  # random pre-subsample before the coreset (CPU budget); 0: all

    # --- output ---
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        self.attention_patch_divisors = tuple(int(x) for x in self.attention_patch_divisors)
        self.decoder_channels = tuple(int(x) for x in self.decoder_channels)
        self.image_hw = tuple(int(x) for x in self.image_hw)
        self.target_size = tuple(float(x) for x in self.target_size)
        if isinstance(self.precision, int) and not isinstance(self.precision, bool):
            self.precision = str(self.precision)  # YAML reads `precision: 32` as a number
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.image_size < 32 or self.image_size % 32:
            problems.append(f"image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.seen_anomalies < 0:
            problems.append(f"seen_anomalies must be >= 0, got {self.seen_anomalies}")
        if not 0 < self.prototype_ratio <= 1:
            problems.append(f"prototype_ratio must be in (0, 1], got {self.prototype_ratio}")
        if self.batch_size < 4 or self.batch_size % 4:
            problems.append(f"batch_size must be a multiple of 4 (2:1:1 structure), got {self.batch_size}")
        if not 0 <= self.beta_min <= self.beta_max < 1:
            problems.append(f"need 0 <= beta_min <= beta_max < 1, got {self.beta_min}, {self.beta_max}")
        if self.category_kind not in ("auto", "object", "texture"):
            problems.append(f"category_kind must be auto, object or texture, got {self.category_kind!r}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if len(self.image_hw) != 2 or (any(self.image_hw) and (
                min(self.image_hw) < 32 or any(v % 32 for v in self.image_hw))):
            problems.append(f"image_hw must be (0, 0) or two multiples of 32 >= 32, got {self.image_hw}")
        if self.optimizer not in ("adam", "adamw"):
            problems.append(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.output_bias_prior < 1:
            problems.append(f"output_bias_prior must be in [0, 1), got {self.output_bias_prior}")
        if not 0 <= self.seen_fraction <= 0.5:
            problems.append(f"seen_fraction must be in [0, 0.5], got {self.seen_fraction}")
        if self.select_epoch not in ("last", "best"):
            problems.append(f"select_epoch must be last or best, got {self.select_epoch!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                            f"got {self.precision!r}")
        if self.num_workers < -1:
            problems.append(f"num_workers must be >= 0, or -1 (sized from the device), got {self.num_workers}")
        if self.map_sigma < 0:
            problems.append(f"map_sigma must be >= 0, got {self.map_sigma}")
        if not 0 <= self.val_normal_fraction < 1 or self.val_normal_min < 0:
            problems.append("val_normal_fraction must be in [0, 1) and val_normal_min >= 0")
        if not 0 <= self.aug1_prob <= 1 or not 0 <= self.aug1_ops <= 7:
            problems.append("aug1_prob must be in [0, 1] and aug1_ops in 0..7")
        if self.gray_textures not in ("auto", "yes", "no"):
            problems.append(f"gray_textures must be auto, yes or no, got {self.gray_textures!r}")
        if not 0 <= self.perlin_min_scale < self.perlin_max_scale <= 8:
            problems.append("need 0 <= perlin_min_scale < perlin_max_scale <= 8")
        if not (len(self.target_size) == 2 and 0 < self.target_size[0] <= self.target_size[1] <= 1):
            problems.append(f"target_size must be (min, max) with 0 < min <= max <= 1, got {self.target_size}")
        if not 0 < self.target_fpr < 1 or not 0 < self.pixel_target_fpr < 1:
            problems.append(f"target_fpr and pixel_target_fpr must be in (0, 1), got "
                            f"{self.target_fpr}, {self.pixel_target_fpr}")
        if self.calibration_tail not in CALIBRATION_TAILS:
            problems.append(f"calibration_tail must be one of {', '.join(CALIBRATION_TAILS)}, "
                            f"got {self.calibration_tail!r}")
        if problems:
            raise ValueError("invalid PRN config: " + "; ".join(problems))

    # The batch is 2:1:1 normal / extended / simulated (Sec. 4.1), kept when batch_size changes.
    @property
    def batch_composition(self) -> tuple[int, int, int]:
        quarter = self.batch_size // 4
        return 2 * quarter, quarter, quarter

    @property
    def batch_slots(self) -> tuple[int, int, int, int]:
        """(normal, extended, simulated, seen) slots per batch: the 2:1:1 composition with
        round(seen_fraction * batch_size) slots taken from the anomalies for the real seen ones,
        from the extended slots first (they are made from the seen anomalies too)."""
        normal, ext, sim = self.batch_composition
        seen = min(ext + sim, round(self.seen_fraction * self.batch_size))
        from_ext = min(ext, (seen + 1) // 2)
        return normal, ext - from_ext, sim - (seen - from_ext), seen

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return tuple(self.image_hw) if any(self.image_hw) else (self.image_size, self.image_size)

    def val_anomaly_count(self) -> int:
        return self.val_anomalies if self.val_anomalies >= 0 else int(0.3 * self.seen_anomalies)

    @property
    def resolved_category_kind(self) -> str:
        if self.category_kind != "auto":
            return self.category_kind
        if self.dataset == "mvtec" and self.category in MVTEC_OBJECTS:
            return "object"
        return "texture"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PRNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "PRNConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "PRNConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config must be a mapping of keys to values")
        return cls.from_dict(data)


# Budget presets: the paper's schedule for a GPU and one that fits a 2-core CPU in 15 minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 700, "batch_size": 64},
    # 200 steps of 16 images instead of the paper's ~6,000 of 64. Each setting below is one row
    # of the ablation in BENCHMARKS.md (issue 9), which says what it bought:
    # - AdamW (decay 1e-4, none on norms and biases), warm-up then cosine, output prior 0.01:
    #   with coupled decay 1e-2 at lr 1e-3 the head shrank to a few percent of its size;
    # - 2 of every 16 images are the real seen anomalies, as they look;
    # - Aug1 ops each with probability 0.5, EA rotated at most 45 degrees and kept whole;
    # - the aspect ratio kept (long side 384, about the pixels of 256 x 256);
    # - the validation fold is scored every epoch (metrics.csv), but the last epoch is kept and
    #   the map is not smoothed: choosing either on 3 validation defects did worse (BENCHMARKS.md).
    "cpu": {"epochs": 10, "batch_size": 16, "steps_per_epoch": 20, "lr": 1e-3,
            "backbone": "tf_efficientnet_lite0", "image_size": 384, "keep_aspect": True,
            "optimizer": "adamw", "weight_decay": 1e-4, "lr_schedule": "cosine", "warmup_fraction": 0.05,
            "output_bias_prior": 0.01, "seen_fraction": 0.125, "aug1_prob": 0.5, "aug2_max_angle": 45.0,
            "ea_clip_to_target": False},
    # The cpu preset before issue 9, kept so its ablation row can be re-run.
    "cpu-v1": {"epochs": 8, "batch_size": 16, "steps_per_epoch": 20, "lr": 1e-3,
               "backbone": "tf_efficientnet_lite0", "image_size": 256},
}


# ----------------------------------------------------------------------------- values from text
# `--set KEY=VALUE` gives text; each field's declared type says what the text must be, so
# "1e-4" is a float for lr and "01" stays a string for category (YAML would make it 1).

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_TYPE_WORDS = {int: "an integer", float: "a finite number", str: "text",
               bool: "true or false (also yes/no, on/off, 1/0)"}


def parse_field(key: str, text: str) -> Any:
    """The value of config field ``key`` from command-line text, converted to the field's type.

        >>> parse_field("lr", "1e-4"), parse_field("category", "01"), parse_field("image_hw", "384,160")
        (0.0001, '01', (384, 160))

    Raises KeyError for an unknown field, ValueError naming the field, the text and the type
    expected when the text does not convert."""
    hints = typing.get_type_hints(PRNConfig)
    if key not in hints:
        raise KeyError(key)
    tp = hints[key]
    try:
        return _convert(text, tp)
    except ValueError:
        raise ValueError(f"{key} takes {_describe(tp)}, got {text!r}") from None


def fields_from_yaml(text: str) -> dict[str, Any]:
    """The fields a YAML config sets, each parsed from its text as parse_field does.

    The file is read with YAML's BaseLoader, which keeps every value as written: YAML 1.1 would
    read ``category: 01`` as the number 1 and ``lr: 1e-4`` as the text '1e-4'; here they are
    "01" and 0.0001, as with --set. Unknown keys are kept for from_dict to report all at once.
    Raises ValueError (yaml.YAMLError for malformed YAML)."""
    data = yaml.load(text, Loader=yaml.BaseLoader)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("a config file must be a mapping of config keys to values")
    hints = typing.get_type_hints(PRNConfig)
    out = {}
    for key, value in data.items():
        if key not in hints:
            out[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = parse_field(key, ",".join(value))
        elif isinstance(value, str):
            out[key] = parse_field(key, value)
        else:
            raise ValueError(f"{key} takes {_describe(hints[key])}, got {value!r}")
    return out


def _convert(text: str, tp: Any) -> Any:
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items = [t for t in re.split(r"[,\s]+", text.strip().strip("[]()")) if t]
        if args[-1] is Ellipsis:
            return tuple(_convert(t, args[0]) for t in items)
        if len(items) != len(args):
            raise ValueError(text)
        return tuple(_convert(t, a) for t, a in zip(items, args))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and text.strip().lower() in ("none", "null", ""):
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return _convert(text, member)
            except ValueError:
                continue
        raise ValueError(text)
    word = text.strip()
    if tp is bool:
        if word.lower() in _TRUE + _FALSE:
            return word.lower() in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(word)  # "1.5", "1e3" and "" are refused rather than rounded
    if tp is float:
        value = float(word)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    return yaml.safe_load(text)  # a field of another kind (none today)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        kind = {int: "integers", float: "numbers"}.get(args[0], "values")
        example = "1" if args[0] is int else "0.5"
        if args[-1] is Ellipsis:
            return f"a list of {kind}, e.g. [{example}, {example}] or {example},{example}"
        n = len(args)
        return f"{n} {kind}, e.g. [{', '.join([example] * n)}] or {','.join([example] * n)}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("none" if m is type(None) else _describe(m) for m in typing.get_args(tp))
    return _TYPE_WORDS.get(tp, str(tp))
