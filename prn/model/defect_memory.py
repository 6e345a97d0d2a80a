"""A memory of the seen defects (ours, outside the paper): their encoder features, matched at test time.

PRN learns its few seen anomalies through the decoder; on a line whose defects repeat one look
(BSData's pits), also *remembering* them stops more parts. At every pixel of the 1/4 map the
frozen encoder's 1/4 and 1/8 features (3 x 3 means, the 1/8 map up-sampled) give (with
``defect_memory_stride`` 2: at every pixel of the 1/2 map, the encoder's 1/2 map, 3 x 3 means,
beside those features up-sampled to it; a pit under one 4 x 4-pixel cell of the 1/4 map covers a
2 x 2 block there)

- ``d_defect``: the distance to the nearest feature inside a seen defect's mask;
- ``d_good``: the norm of PRN's own prototype residual |F - P*| there (how far from good parts).

The memory's image score is the largest ``d_good / d_defect`` of the image; it is fused with PRN's
as ``sigmoid((z(PRN) + z(memory)) / FUSED_SCALE)``, each z standardised by the held-out good
images' mean and deviation. Whether to keep it is asked of the seen defects alone, before any test
image: each is scored by the memory of the *others*, against the held-out good images (an AUROC,
``loo_auroc``); where they do not recognise one another (KolektorSDD's cracks: about 0.55) the
memory only adds noise to the score of the defects it has not seen, and ``auto`` leaves it out.
BENCHMARKS.md, "A memory of the seen defects, gated", has the figures and what was chosen after
seeing them.

    >>> memory = DefectMemory()
    >>> info = remember(model, seen_images, seen_masks, good_images, good_prn_scores, gate=0.9, mode="auto")
    >>> model(x)["pred_score"]       # the fused score once ``model.defect_memory.built``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn.model.prototypes import exporting
from prn.precision import full_precision

# The fused score is sigmoid of the z-sum over this: a score in (0, 1) as PRN's, which keeps its
# contracts (the calibration's bound, the normalised score), far from float32's saturation at 1
# for the z-sums of real defects (tens), and nearly linear over good parts' (a few units), where a
# threshold's tail is fitted.
FUSED_SCALE = 8.0
# A memory that ``auto`` leaves out this little under the gate is said to be close: on twenty
# splits of the two development sets the gate separated them by 0.095 at the narrowest (BSData
# 0.852, left out, where forced on it helped a little; KolektorSDD 0.757), so a third set may land
# there, where trying the memory is worth a look. Above the gate every kept memory helped.
NEAR_GATE = 0.05
STRIDES = (4, 2)  # the grids a memory matches at: 1/4 (the encoder's finest tap) or 1/2 of the input
# At stride 2 the bank holds every 1/2-map pixel of the seen defects' masks (BSData: 318-742) and each
# test image has four times the pixels: the match would cost up to 75 ms an image on one core. A
# greedy k-center subset of the bank keeps its spread at a bounded cost (stride 4 keeps every
# feature, as before: BSData's banks there are 118-247).
MAX_FEATURES = 256


def pixel_features(feats: list[Tensor], half: Tensor | None = None) -> Tensor:
    """(B, C, H/4, W/4) float32 from the encoder's taps (or their prototype residuals): the 1/4 and
    1/8 maps, 3 x 3 means (a pit of a few pixels keeps its neighbourhood), the 1/8 one up-sampled,
    concatenated. Given the encoder's 1/2 map ``half``: (B, C', H/2, W/2), its 3 x 3 means beside
    those features up-sampled to it."""
    fine = F.avg_pool2d(feats[0].float(), 3, 1, 1)
    coarse = F.interpolate(F.avg_pool2d(feats[1].float(), 3, 1, 1), size=fine.shape[-2:], mode="bilinear",
                           align_corners=False)
    quarter = torch.cat([fine, coarse], dim=1)
    if half is None:
        return quarter
    finest = F.avg_pool2d(half.float(), 3, 1, 1)
    return torch.cat([finest, F.interpolate(quarter, size=finest.shape[-2:], mode="bilinear", align_corners=False)],
                     dim=1)


def nearest_distance(query: Tensor, bank: Tensor, chunk: int = 1024, rows: int = 4096) -> Tensor:
    """(N,) Euclidean distance of each row of ``query`` (N, C) to its nearest row of ``bank`` (M, C).
    ``||a - b||^2 = ||a||^2 - 2ab + ||b||^2``, one fused matrix product (addmm) per ``chunk`` rows of
    the bank and ``rows`` of the query, taken about the bank's mean for float32's sake, as
    ``prn.model.prototypes.nearest_prototype``. Blocks of the query that stay in cache made it
    twice as fast on the CPU (3.4 against 7.6 ms per KolektorSDD image, 502 features, one thread);
    an exported graph has a symbolic batch, so there only the bank, whose size is fixed, is cut, in
    blocks of at most 256 (a batch of 16 BSData images against 256 features: 100 MB)."""
    in_graph = exporting()
    if in_graph:  # every pixel of the batch against a block at once: keep the block small
        chunk = min(chunk, 256)
    centre = bank.mean(dim=0, keepdim=True)
    q = query - centre
    parts = [(b, b.square().sum(dim=1)[None, :]) for b in (bank - centre).split(chunk)]

    def nearest_squared(block: Tensor) -> Tensor:
        best = None
        for b, b2 in parts:
            d2 = torch.addmm(b2, block, b.T, alpha=-2.0).amin(dim=1)
            best = d2 if best is None else torch.minimum(best, d2)
        return best + block.square().sum(dim=1)

    d2 = nearest_squared(q) if in_graph else torch.cat([nearest_squared(block) for block in q.split(rows)])
    return d2.clamp_min(0.0).sqrt()


def good_distance(residuals: list[Tensor], size: tuple[int, int]) -> Tensor:
    """(B, h, w) ``d_good``: the norm of PRN's raw prototype residuals' pixel features (1/4 map),
    up-sampled to the matched grid ``size`` where that is finer (stride 2)."""
    d_good = pixel_features(residuals).norm(dim=1, keepdim=True)
    if d_good.shape[-2:] != tuple(size):
        d_good = F.interpolate(d_good, size=tuple(size), mode="bilinear", align_corners=False)
    return d_good[:, 0]


def largest_ratio(f: Tensor, d_good: Tensor, bank: Tensor) -> Tensor:
    """(B,) each image's largest ``d_good / d_defect`` of pixel features ``f`` (B, C, h, w) against
    the defect features ``bank`` (M, C)."""
    n, c, h, w = f.shape
    d_defect = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(n, h, w)
    return (d_good / (d_defect + 1e-6)).flatten(1).max(dim=1).values


def memory_scores(taps: list[Tensor], residuals: list[Tensor], bank: Tensor, half: Tensor | None = None) -> Tensor:
    """(B,) each image's largest ``d_good / d_defect`` against the defect features ``bank`` (M, C);
    taps and residuals: the encoder's maps and PRN's raw prototype residuals, per scale; ``half``:
    the encoder's 1/2 map, for a memory of stride 2 (``d_good``, of the 1/4 map, up-sampled to it)."""
    f = pixel_features(taps, half)
    return largest_ratio(f, good_distance(residuals, f.shape[-2:]), bank)


def features_inside(f: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The pixel features ``f`` (N, C, h, w) inside the masks (N, 1, H, W), max-pooled to f's grid
    so that a pit of a few pixels keeps its cell: (M, C), and the image each came from, (M,)."""
    inside = F.adaptive_max_pool2d(masks.float(), f.shape[-2:])[:, 0] > 0
    owner = torch.arange(len(f), device=f.device)[:, None, None].expand_as(inside)[inside]
    return f.permute(0, 2, 3, 1)[inside], owner


def defect_features(taps: list[Tensor], masks: Tensor, half: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The pixel features inside the defects' masks (``features_inside``), and the image each came
    from; taps: the defect images' encoder maps (and their 1/2 map ``half`` for stride 2), masks (N,
    1, H, W) at the input size."""
    return features_inside(pixel_features(taps, half), masks)


class DefectMemory(nn.Module):
    """Buffers ``features`` (M, C), the seen defects' pixel features, and ``standard`` (4,): the
    held-out good images' mean and deviation of PRN's score and of the memory's. Empty until
    ``set``; an empty memory leaves PRN's score as it is. Checkpoints written before the memory
    existed load into an empty one. ``stride`` (4 or 2, the model config's
    ``defect_memory_stride``): the grid it matches at; 2 needs the encoder's 1/2 map."""

    def __init__(self, stride: int = 4):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"a defect memory's stride is one of {STRIDES}, got {stride}")
        self.stride = stride
        self.register_buffer("features", torch.empty(0))
        self.register_buffer("standard", torch.empty(0))

    @property
    def built(self) -> bool:
        return self.features.dim() == 2 and self.features.shape[0] > 0 and self.standard.numel() == 4

    def set(self, features: Tensor, standard: Tensor) -> None:
        if features.dim() != 2 or features.shape[0] < 1 or standard.numel() != 4:
            raise ValueError(f"a defect memory needs (M >= 1, C) features and 4 statistics, got "
                             f"{tuple(features.shape)} and {standard.numel()}")
        device = self.features.device
        self.features = features.detach().float().to(device).contiguous()
        self.standard = standard.detach().float().to(device).reshape(4)

    def clear(self) -> None:
        self.features = torch.empty(0, device=self.features.device)
        self.standard = torch.empty(0, device=self.features.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = [prefix + n for n in ("features", "standard")]
        for key in names:  # the buffers take the stored shapes; absent, they are an empty memory
            stored = state_dict.get(key)
            name = key[len(prefix):]
            device = getattr(self, name).device
            setattr(self, name, torch.empty(0 if stored is None else stored.shape,
                                            dtype=torch.float32 if stored is None else stored.dtype, device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[:] = [k for k in missing_keys if k not in names]  # a checkpoint from before the memory

    @property
    def needs_half(self) -> bool:
        """Whether matching needs the encoder's 1/2 map."""
        return self.built and self.stride == 2

    def fuse(self, prn_score: Tensor, taps: list[Tensor], residuals: list[Tensor],
             half: Tensor | None = None) -> Tensor:
        """(B,) the fused image score of PRN's ``prn_score`` (B,) and the memory's (``half``: the
        encoder's 1/2 map, for stride 2)."""
        if self.stride == 2 and half is None:
            raise ValueError("a defect memory of stride 2 matches the encoder's 1/2 map; none was given")
        with full_precision(prn_score):
            memory = memory_scores(taps, residuals, self.features, half if self.stride == 2 else None)
            m = self.standard
            z = (prn_score.float() - m[0]) / m[1] + (memory - m[2]) / m[3]
            return torch.sigmoid(z / FUSED_SCALE)

    def extra_repr(self) -> str:
        return f"features={tuple(self.features.shape)}, stride={self.stride}"


def left_out(why: str) -> dict:
    """What ``remember`` returns when no memory is built, and why."""
    return {"loo_auroc": None, "features": 0, "used": False, "why": why}


def mean_sd(scores: Tensor) -> tuple[float, float]:
    """Mean and deviation (population, floored) of held-out good images' scores."""
    s = scores.double()
    return float(s.mean()), max(float(s.std(unbiased=False)) if len(s) > 1 else 0.0, 1e-12)


@torch.no_grad()
def remember(model: nn.Module, seen_images: Tensor, seen_masks: Tensor, good_images: Tensor,
             good_prn_scores: Tensor, *, mode: str, gate: float, batch_size: int = 8) -> dict:
    """Build ``model.defect_memory`` (a PRN with prototypes, eval mode) from the seen defects.

    seen_images: float32 (N, 3, H, W) in [0, 1] of the seen anomalies with pixel masks, seen_masks
    (N, 1, H, W) in {0, 1}; good_images: the held-out good images (M, 3, H, W) and PRN's scores of
    them (M,). ``mode`` "on" keeps the memory, "auto" keeps it when the seen defects recognise one
    another (``loo_auroc >= gate``). Returns what was found: {"loo_auroc", "features", "used", "why"}.
    """
    from prn.metrics import image_auroc  # sklearn, at fit time only

    model.defect_memory.clear()
    device = next(model.parameters()).device
    fine = model.defect_memory.stride == 2

    def taps_of(images: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """The encoder's taps of a batch, their prototype residuals, and its 1/2 map at stride 2."""
        t, half = model.encoder(images.to(device), half=True)  # the 1/2 map is computed either way
        t = [f.float() for f in t]
        return t, model.prototypes.residuals(t), half.float() if fine else None

    marked = seen_masks.flatten(1).amax(dim=1) > 0  # a mask with no pixel adds nothing to remember
    seen_images, seen_masks = seen_images[marked], seen_masks[marked]
    if len(seen_images) < 2 or len(good_images) < 2:
        return left_out(f"{len(seen_images)} seen defects with masks and {len(good_images)} held-out good "
                        f"images: at least 2 of each are needed to build and judge a memory")
    parts = [taps_of(seen_images[i:i + batch_size]) for i in range(0, len(seen_images), batch_size)]
    seen_taps = [torch.cat(scale) for scale in zip(*(taps for taps, _, _ in parts))]
    seen_res = [torch.cat(scale) for scale in zip(*(res for _, res, _ in parts))]
    seen_half = torch.cat([half for _, _, half in parts]) if fine else None
    bank, owner = defect_features(seen_taps, seen_masks.to(device), seen_half)
    if fine and len(bank) > MAX_FEATURES:  # each kept feature keeps its owner for the leave-one-out check
        from prn.baselines.patchcore import greedy_coreset
        keep = greedy_coreset(bank, MAX_FEATURES)
        bank, owner = bank[keep], owner[keep]

    def scored(images: Tensor) -> Tensor:
        taps, residuals, half = taps_of(images)
        return memory_scores(taps, residuals, bank, half)

    # the good images a batch at a time: their taps are let go once scored (a fit's peak is near)
    good_memory = torch.cat([scored(good_images[i:i + batch_size]) for i in range(0, len(good_images), batch_size)])
    # each seen defect against the memory of the others: do they recognise one another?
    loo = torch.cat([memory_scores([t[i:i + 1] for t in seen_taps], [r[i:i + 1] for r in seen_res],
                                   bank[owner != i], None if seen_half is None else seen_half[i:i + 1])
                     for i in range(len(seen_images))])
    auroc = image_auroc(torch.cat([torch.ones(len(loo)), torch.zeros(len(good_memory))]).numpy(),
                        torch.cat([loo, good_memory]).cpu().numpy())
    used = mode == "on" or (mode == "auto" and auroc >= gate)
    if used:
        model.defect_memory.set(bank, torch.tensor([*mean_sd(good_prn_scores), *mean_sd(good_memory.cpu())]))
    why = ("asked for (defect_memory on)" if mode == "on" else
           f"{'at or above' if used else 'below'} the gate {gate:g} (defect_memory auto)")
    found = {"loo_auroc": auroc, "features": int(len(bank)), "stride": model.defect_memory.stride, "used": used,
             "why": why}
    if mode == "auto":
        found["near_gate"] = bool(not used and auroc >= gate - NEAR_GATE)
    return found


def memory_summary(found: dict) -> str:
    """One line on a defect memory built or left out (``remember``'s dict)."""
    auroc = found.get("loo_auroc")
    at = f" at 1/{found['stride']} of the input" if found.get("stride", 4) != 4 else ""
    head = f"defect memory kept ({found['features']} features{at})" if found["used"] else "defect memory left out"
    line = (f"{head}: "
            + (f"the seen defects recognise one another at AUROC {auroc:.3f}, {found['why']}"
               if auroc is not None else found["why"]))
    if found.get("near_gate"):
        line += (f"; within {NEAR_GATE:g} under it, so the memory may help here too: `prn calibrate COPY "
                 f"--defect-memory on` on a copy of the run tries it without refitting, and `prn compare "
                 f"RUN COPY --data FOLDER` shows what changes on labelled parts")
    return line
