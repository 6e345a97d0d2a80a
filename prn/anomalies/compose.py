"""Putting anomaly generation together: the generator, the training set and the 2:1:1 batches.

- ``AnomalyGenerator`` turns a normal image into an extended (EA) or simulated (HEA / HOA)
  anomaly, following the switches of PRNConfig (Table 5 of the paper).
- ``TrainingSet`` is a torch Dataset indexed by ``(kind, i, seed)``: each item builds its own
  ``numpy.random.default_rng(seed)``, so a sample depends on its key alone, not on which
  DataLoader worker makes it or when.
- ``BalancedBatchSampler`` yields batches of such keys, normal / extended / simulated in
  cfg.training.batch_composition (2:1:1, Sec. 4.1), every seed derived from (seed, epoch, batch, slot).

    gen = AnomalyGenerator(cfg, seen, cfg.data.resolved_category_kind)
    data = TrainingSet(normals, gen, cfg)
    loader = DataLoader(data, batch_sampler=BalancedBatchSampler(len(normals), cfg, seed=0, epoch=0))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from prn.anomalies.augment import mild_augment
from prn.anomalies.extended import make_extended
from prn.anomalies.simulated import make_heterologous, make_homologous, stroke_decision
from prn.anomalies.target_areas import foreground_mask, sample_target_area
from prn.anomalies.textures import TextureSource
from prn.config import PRNConfig
from prn.data.sample import ANNOTATIONS
from prn.preprocess import resize_image, to_tensor
from prn.tiling import tile_at, tile_of_pixel

STRATEGIES = ("extended", "heterologous", "homologous")
KINDS = ("normal", "extended", "simulated", "seen")


def is_gray(image: np.ndarray) -> bool:
    """Whether a uint8 (H, W, 3) image is gray: its three channels are equal."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def texture_for(texture: np.ndarray, hw: tuple[int, int], gray: bool) -> np.ndarray:
    """A square texture cropped to (H, W) (its side is max(H, W)), in gray when ``gray``."""
    out = texture[:hw[0], :hw[1]]
    if gray:
        luma = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        out = np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def _check_image(image: np.ndarray, what: str) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what} must be a uint8 (H, W, 3) array, got {got}")


class AnomalyGenerator:
    """Makes anomalies from normal images.

    cfg: the switches extended_anomalies, heterologous_anomalies, homologous_anomalies,
    target_areas, beta_min/beta_max, perlin_threshold, homologous_grid, texture_dir, strokes
    (``self.strokes`` says whether they are drawn and why).
    seen: the seen anomalies, ``(uint8 (S, S, 3), bool (S, S))`` pairs or ``(image, mask,
    annotation)`` triples (``prn.data.sample.ANNOTATIONS``: "mask" pixels, "box" a loose region,
    "label" no region); a mask or box that is empty is skipped. EA are made from those with a
    region (a box gives a loose EA, annotated "box"); every one can fill a "seen" slot as itself.
    category_kind: "object" (target areas on the estimated foreground),
    "texture" (anywhere) or "auto" (cfg.data.resolved_category_kind). texture_dir: overrides
    cfg.synthesis.texture_dir ("" or None: procedural textures). seen_weights: how often each
    seen anomaly fills a "seen" slot, relative to the others (None: all alike); a retrain gives
    the defects it adds a fixed share of those slots (``seen_draw_weights``).

    EA are available when enabled and at least one seen anomaly has a defect; a request for an
    unavailable kind is served by the other (``generate``). With nothing available at all the
    constructor raises ValueError.
    """

    def __init__(self, cfg: PRNConfig, seen: Sequence[tuple[np.ndarray, np.ndarray]], category_kind: str,
                 texture_dir: str | None = None, gray: bool | None = None,
                 seen_weights: Sequence[float] | None = None):
        kind = cfg.data.resolved_category_kind if category_kind == "auto" else category_kind
        if kind not in ("object", "texture"):
            raise ValueError(f"category_kind must be 'object' or 'texture', got {category_kind!r}")
        self.cfg = cfg
        self.category_kind = kind
        self.seen = []  # (image, mask, annotation)
        if seen_weights is not None and (len(seen_weights) != len(seen) or min(seen_weights, default=1) < 0):
            raise ValueError(f"seen_weights must be {len(seen)} weights >= 0, got {list(seen_weights)}")
        kept_weights = []
        for j, item in enumerate(seen):
            image, mask, annotation = item if len(item) == 3 else (*item, "mask")
            _check_image(image, f"seen anomaly {j}")
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"seen anomaly {j}: mask shape {mask.shape} differs from image shape {image.shape[:2]}")
            if annotation not in ANNOTATIONS:
                raise ValueError(f"seen anomaly {j}: annotation must be one of {ANNOTATIONS}, got {annotation!r}")
            if mask.any() or annotation == "label":
                self.seen.append((image, mask, annotation))
                kept_weights.append(1.0 if seen_weights is None else float(seen_weights[j]))
        total = sum(kept_weights)
        # None keeps the uniform draw's random stream (runs before weights existed replay exactly)
        self.seen_p = (None if seen_weights is None or total <= 0
                       else np.asarray(kept_weights) / total)
        self.sources = [s for s in self.seen if s[2] != "label"]  # what EA can cut a defect from
        self.strokes = stroke_decision(cfg.synthesis.strokes, self.seen, cfg.synthesis.stroke_gate)

        enabled = {"extended": cfg.synthesis.extended_anomalies and bool(self.sources),
                   "heterologous": cfg.synthesis.heterologous_anomalies, "homologous": cfg.synthesis.homologous_anomalies}
        self.strategies = [s for s in STRATEGIES if enabled[s]]
        if not self.strategies:
            why = ("extended anomalies are off" if not cfg.synthesis.extended_anomalies
                   else "extended anomalies need seen anomalies with a defect mask, and there are none")
            raise ValueError(f"no anomaly generation strategy is available: {why}, and both heterologous and "
                             "homologous anomalies are off. Enable heterologous_anomalies or "
                             "homologous_anomalies, or extended_anomalies with seen_anomalies > 0")
        texture_dir = cfg.synthesis.texture_dir if texture_dir is None else texture_dir
        self.textures = (TextureSource(texture_dir or None, max(cfg.model.tile_hw), cfg.data.max_image_pixels)
                         if cfg.synthesis.heterologous_anomalies else None)
        # Textures in colour on gray parts would be anomalies no gray camera can show.
        # gray: whether the normal images are gray (the caller knows them); else judged from the seen ones.
        wanted = {"yes": True, "no": False}.get(cfg.synthesis.gray_textures)
        if wanted is None:
            wanted = gray if gray is not None else bool(self.seen) and all(is_gray(s[0]) for s in self.seen[:3])
        self.gray_textures = wanted

    @property
    def stroke_share(self) -> float:
        """The share of simulated anomalies drawn as strokes: the config's when they are used, else 0."""
        return self.cfg.synthesis.stroke_share if self.strokes["used"] else 0.0

    @property
    def can_extend(self) -> bool:
        return "extended" in self.strategies

    @property
    def simulated_strategies(self) -> list[str]:
        return [s for s in self.strategies if s != "extended"]

    @property
    def uses_foreground(self) -> bool:
        return self.cfg.synthesis.target_areas and self.category_kind == "object"

    def foreground(self, normal: np.ndarray) -> np.ndarray | None:
        """The foreground that target areas are clipped to: bool (H, W), or None (anywhere)."""
        return foreground_mask(normal) if self.uses_foreground else None

    def target_area(self, normal: np.ndarray, rng: np.random.Generator,
                    foreground: np.ndarray | None = None) -> np.ndarray:
        """A random target area for ``normal``: bool (H, W), non-empty; the whole image when TA is off.

        foreground: a precomputed ``self.foreground(normal)`` (computed here when None).
        """
        hw = normal.shape[:2]
        if not self.cfg.synthesis.target_areas:
            return np.ones(hw, bool)
        if self.uses_foreground and foreground is None:
            foreground = self.foreground(normal)
        return sample_target_area(hw, rng, foreground if self.uses_foreground else None,
                                  size_range=self.cfg.synthesis.target_size)

    def make(self, strategy: str, normal: np.ndarray, rng: np.random.Generator,
             foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One anomaly of ``strategy`` (extended, heterologous or homologous) on a uint8 (H, W, 3)
        normal image. Returns (image uint8 (H, W, 3), mask bool (H, W), target area bool (H, W))."""
        return self._make(strategy, normal, rng, foreground)[:3]

    def _make(self, strategy: str, normal: np.ndarray, rng: np.random.Generator,
              foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """``make``, and the annotation of the mask made: "box" for EA cut from a box, else "mask"."""
        annotation = "mask"
        if strategy not in self.strategies:
            raise ValueError(f"strategy {strategy!r} is not available; available: {self.strategies}")
        _check_image(normal, "normal image")
        cfg = self.cfg
        target = self.target_area(normal, rng, foreground)
        beta = float(rng.uniform(cfg.synthesis.beta_min, cfg.synthesis.beta_max))
        if strategy == "extended":
            seen_image, seen_mask, annotation = self.sources[int(rng.integers(len(self.sources)))]
            seen_image, seen_mask = self.tile_of(seen_image, seen_mask, rng)
            if seen_image.shape != normal.shape:
                raise ValueError(f"seen anomaly of shape {seen_image.shape} cannot extend onto a normal "
                                 f"image of shape {normal.shape}; resize both to image_size")
            image, mask = make_extended(normal, seen_image, seen_mask, target, beta, rng,
                                        aug1_ops=cfg.synthesis.aug1_ops, aug1_prob=cfg.synthesis.aug1_prob,
                                        max_angle=cfg.synthesis.aug2_max_angle, clip_to_target=cfg.synthesis.ea_clip_to_target,
                                        min_scale=cfg.synthesis.ea_scale_min)
        else:
            opts = dict(aug1_ops=cfg.synthesis.aug1_ops, aug1_prob=cfg.synthesis.aug1_prob,
                        scales=(cfg.synthesis.perlin_min_scale, cfg.synthesis.perlin_max_scale),
                        stroke_share=self.stroke_share, stroke_width=cfg.synthesis.stroke_width)
            if strategy == "heterologous":
                texture = texture_for(self.textures.sample(rng, size=max(normal.shape[:2])),
                                      normal.shape[:2], self.gray_textures)
                image, mask = make_heterologous(normal, texture, target, beta, cfg.synthesis.perlin_threshold, rng, **opts)
            else:
                image, mask = make_homologous(normal, target, beta, cfg.synthesis.perlin_threshold, cfg.synthesis.homologous_grid,
                                              rng, **opts)
        return image, mask, target, annotation

    def extended(self, normal: np.ndarray, rng: np.random.Generator,
                 foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An extended anomaly: (uint8 (H, W, 3), bool (H, W)). ValueError when EA are unavailable."""
        if not self.can_extend:
            raise ValueError("extended anomalies are not available: they are switched off or there are "
                             "no seen anomalies with a defect mask or box")
        return self.make("extended", normal, rng, foreground)[:2]

    def simulated(self, normal: np.ndarray, rng: np.random.Generator,
                  foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A simulated anomaly, HEA or HOA at random among those enabled: (uint8, bool)."""
        kinds = self.simulated_strategies
        if not kinds:
            raise ValueError("simulated anomalies are not available: heterologous and homologous "
                             "anomalies are both switched off")
        return self.make(kinds[int(rng.integers(len(kinds)))], normal, rng, foreground)[:2]

    def seen_as_itself(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random seen anomaly as it looks, mildly augmented (``mild_augment``): (uint8, bool)."""
        return self._seen_as_itself(rng)[:2]

    def _seen_as_itself(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        if not self.seen:
            raise ValueError("there are no seen anomalies")
        j = int(rng.integers(len(self.seen))) if self.seen_p is None else int(rng.choice(len(self.seen), p=self.seen_p))
        image, mask, annotation = self.seen[j]
        image, mask = self.tile_of(image, mask, rng)
        return (*mild_augment(image, mask, rng), annotation)

    def tile_of(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """With cfg.model.tiles > 1, the grid tile of a seen anomaly that holds one of its defect
        pixels, drawn at random; a defect known by its label alone (empty mask) is shrunk whole to
        a tile's size instead, since no tile is known to hold it. Unchanged with one tile."""
        t = self.cfg.model.tiles
        if t == 1:
            return image, mask
        if not mask.any():
            h, w = image.shape[0] // t, image.shape[1] // t
            return resize_image(image, (h, w)), np.zeros((h, w), bool)
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))
        row, col = tile_of_pixel(mask.shape, t, int(ys[k]), int(xs[k]))
        return tile_at(image, t, row, col), tile_at(mask, t, row, col)

    def generate(self, kind: str, normal: np.ndarray, rng: np.random.Generator,
                 foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """Fills a batch slot of ``kind`` ("extended", "simulated" or "seen"); a slot whose kind is
        unavailable gets another (seen -> extended -> simulated). Returns (image, mask, the kind made)."""
        return self.generate_annotated(kind, normal, rng, foreground)[:3]

    def generate_annotated(self, kind: str, normal: np.ndarray, rng: np.random.Generator,
                           foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str, str]:
        """``generate``, and what the mask made says (annotation "mask", "box" or "label")."""
        if kind not in ("extended", "simulated", "seen"):
            raise ValueError(f"kind must be 'extended', 'simulated' or 'seen', got {kind!r}")
        if kind == "seen":
            if self.seen:
                image, mask, annotation = self._seen_as_itself(rng)
                return image, mask, "seen", annotation
            kind = "simulated"
        if kind == "extended" and not self.can_extend:
            kind = "simulated"
        elif kind == "simulated" and not self.simulated_strategies:
            kind = "extended"
        if kind == "extended":  # available here: the constructor ensured some strategy is
            image, mask, _, annotation = self._make("extended", normal, rng, foreground)
            return image, mask, kind, annotation
        image, mask = self.simulated(normal, rng, foreground)
        return image, mask, kind, "mask"


class TrainingSet(Dataset):
    """Normal images and anomalies made on the fly, indexed by ``(kind, i, seed)``.

    kind: "normal", "extended" or "simulated"; i: index of the normal image; seed: int >= 0.
    Returns {"image": float32 (3, S, S) in [0, 1], "mask": float32 (1, S, S) in {0, 1},
    "kind": the kind made (an unavailable anomaly kind is replaced by the other), and what the
    item teaches: "weight" float32 (1, S, S), 1 where the pixel loss counts the pixel, "label"
    float32 (), the image's label, "weak" float32 (), 1 when the defect is known only as an
    image label or a loose box (the loss then asks the map's top pixels, inside the box or
    anywhere, to be high: ``prn.model.loss.weak_loss``)}. A box's inside does not count in the
    pixel loss (its unmarked part may be good), its outside does; a label alone counts no pixel.
    Normal items are the images unchanged, with an all-zero mask. With cfg.model.tiles > 1 the
    normal images are whole (``input_hw``) and each item is made on one tile of the grid, drawn by
    its seed (``prn.tiling``), so S x S is ``tile_hw``.
    """

    def __init__(self, normals: Sequence[np.ndarray], generator: AnomalyGenerator, cfg: PRNConfig):
        if len(normals) == 0:
            raise ValueError("TrainingSet needs at least one normal image")
        for j, image in enumerate(normals):
            _check_image(image, f"normal image {j}")
            if image.shape != normals[0].shape:
                raise ValueError(f"normal image {j} has shape {image.shape}, normal image 0 has {normals[0].shape}")
        self.normals = list(normals)
        self.generator = generator
        self.cfg = cfg
        self._foregrounds: dict[int, np.ndarray | None] = {}  # per process: each worker fills its own

    def __len__(self) -> int:
        return len(self.normals)

    def foreground(self, i: int) -> np.ndarray | None:
        if i not in self._foregrounds:
            self._foregrounds[i] = self.generator.foreground(self.normals[i])
        return self._foregrounds[i]

    def __getitem__(self, key: tuple[str, int, int]) -> dict:
        kind, i, seed = key
        normal = self.normals[i]
        foreground = self.foreground(i) if kind != "normal" else None
        t = self.cfg.model.tiles
        rng = np.random.default_rng(seed)
        flips = self.cfg.synthesis.normal_flips
        if flips != "none":  # no draw otherwise, so the default's items stay as they were
            axes = [axis for axis, name in ((1, "lr"), (0, "ud")) if flips in (name, "both") and rng.random() < 0.5]
            if axes:
                normal = np.ascontiguousarray(np.flip(normal, axis=axes))
                foreground = None if foreground is None else np.ascontiguousarray(np.flip(foreground, axis=axes))
        if t > 1:  # one tile of the grid, at random (prn.tiling)
            row, col = (int(v) for v in rng.integers(t, size=2))
            normal = np.ascontiguousarray(tile_at(normal, t, row, col))
            foreground = None if foreground is None else tile_at(foreground, t, row, col)
        if kind == "normal":
            image, mask, annotation = normal, np.zeros(normal.shape[:2], bool), "mask"
        elif kind in ("extended", "simulated", "seen"):
            image, mask, kind, annotation = self.generator.generate_annotated(kind, normal, rng, foreground)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        mask_t = torch.from_numpy(mask)[None].float()
        weight = {"mask": torch.ones_like(mask_t), "box": 1.0 - mask_t,
                  "label": torch.zeros_like(mask_t)}[annotation]
        label = 1.0 if annotation != "mask" or mask.any() else 0.0
        return {"image": to_tensor(image),  # the one uint8 -> [0, 1] conversion of inference
                "mask": mask_t, "kind": kind, "weight": weight,
                "label": torch.tensor(label), "weak": torch.tensor(float(annotation != "mask"))}


def seen_draw_weights(samples: Sequence, share: float) -> list[float] | None:
    """Weights for drawing seen anomalies (``Sample``s): the ``added`` ones (a retrain's corrections) together
    ``share`` of the draws, the others the rest, each alike within its group. None (uniform) when
    share is 0 or the samples are not of two groups."""
    added = [bool(s.added) for s in samples]
    n_added = sum(added)
    if share <= 0 or n_added in (0, len(added)):
        return None
    return [share / n_added if a else (1 - share) / (len(added) - n_added) for a in added]


def item_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """The seed of one batch slot, a function of (seed, epoch, batch, slot) alone."""
    return int(np.random.SeedSequence(seed, spawn_key=(epoch, batch, slot)).generate_state(1, np.uint64)[0])


class BalancedBatchSampler(Sampler):
    """Yields ``steps`` batches, each a list of ``(kind, i, seed)`` keys: cfg.training.batch_slots
    normal, extended, simulated and seen slots in that order (2:1:1 without seen slots).

    Normal slots walk through a seeded permutation of the normal images (a fresh permutation
    when one is used up); anomaly slots draw their base normal image at random. Everything
    depends on (seed, epoch) only. steps: default cfg.training.steps_per_epoch when > 0, else one pass
    over the normal images, ceil(n_normal / normal slots per batch).

    With ``world_size`` N > 1 (distributed training, prn.distributed) this is rank ``rank``'s
    share of the global batch of cfg.training.batch_size: slots rank, rank + N, ... of the batch above.
    The ranks' shares together are the one-process batch, so its composition, and every item,
    does not depend on the number of processes. cfg.training.batch_size must be a multiple of N.
    """

    def __init__(self, n_normal: int, cfg: PRNConfig, seed: int, epoch: int, steps: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if n_normal < 1:
            raise ValueError(f"need at least one normal image, got n_normal={n_normal}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if sum(cfg.training.batch_slots) % world_size:
            raise ValueError(f"batch_size {sum(cfg.training.batch_slots)} does not split evenly over {world_size} "
                             f"processes; use a multiple of {world_size} (and of 4)")
        self.n_normal = int(n_normal)
        self.composition = cfg.training.batch_slots
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        if steps is None:
            steps = cfg.training.steps_per_epoch if cfg.training.steps_per_epoch > 0 else math.ceil(n_normal / self.composition[0])
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        n_norm, n_ext, n_sim, n_seen = self.composition
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        needed = self.steps * n_norm
        order = np.concatenate([rng.permutation(self.n_normal)
                                for _ in range(math.ceil(needed / self.n_normal))])
        kinds = ["normal"] * n_norm + ["extended"] * n_ext + ["simulated"] * n_sim + ["seen"] * n_seen
        for b in range(self.steps):
            bases = rng.integers(self.n_normal, size=n_ext + n_sim + n_seen)
            indices = np.concatenate([order[b * n_norm:(b + 1) * n_norm], bases])
            batch = [(kind, int(i), item_seed(self.seed, self.epoch, b, slot))
                     for slot, (kind, i) in enumerate(zip(kinds, indices))]
            yield batch[self.rank::self.world_size]


class EpochBatches(Sampler):
    """The batches of several epochs, one after the other, each epoch's from its own
    ``BalancedBatchSampler``: one DataLoader, and one set of worker processes, for a whole fit.
    Workers started anew each epoch made the first step of every epoch wait for them (0.3-0.4 s
    an epoch on the 2-core machine, BENCHMARKS.md "One set of data workers for a fit"); kept,
    they make the next epoch's first batches while the last epoch is scored and saved. The keys are those of the samplers, so
    every batch is the same as with a loader an epoch."""

    def __init__(self, samplers: Sequence[BalancedBatchSampler]):
        self.samplers = list(samplers)

    def __len__(self) -> int:
        return sum(len(s) for s in self.samplers)

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        for sampler in self.samplers:
            yield from sampler
