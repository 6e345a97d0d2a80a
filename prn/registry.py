"""The model kinds of prn and what each needs to be built, fitted, saved and loaded.

Three kinds share one config, split, run folder and checkpoint format:

| kind | module | fit |
| --- | --- | --- |
| ``prn`` | ``prn.model.network.PRN`` | k-means prototypes, then the training loop (``prn.train``) |
| ``prototypes`` | ``prn.baselines.prototype_map`` | k-means prototypes only: the residual map |
| ``patchcore`` | ``prn.baselines.patchcore`` | a memory bank of normal patches (unsupervised) |

Every fit ends with the validation fold's outputs of the model it keeps, from which
``prn.api.fit`` calibrates; ``save_model`` writes ``checkpoints/model.pt`` once. Loading
(``prn.deploy.loading``) builds an empty model of the checkpoint's kind here, so nothing that
serves a model imports the training code.

    >>> model = build("patchcore", cfg)
    >>> result = fit("prototypes", cfg, split, run_dir)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from prn.checkpoint import save_checkpoint
from prn.config import PRNConfig
from prn.errors import PRNError

KINDS = ("prn", "patchcore", "prototypes")


@dataclass
class FitResult:
    """A fitted model (eval mode), its history (epochs, timings), the epoch kept (0 for the kinds
    that train nothing), the validation fold's outputs of that model (``prn.infer.Predictions``,
    None without a fold), what the checkpoint's ``extra`` should record, and the seconds spent in
    each phase of the fit (``timings.json``'s ``fit_phases_seconds``)."""
    model: nn.Module
    history: list
    epoch: int = 0
    validation: object = None
    extra: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)


def score_bound(kind: str) -> float | None:
    """The largest image score a model kind can give: 1 for PRN (its map is a probability and the
    image score a mean of map pixels or the head's probability); none for distances."""
    return 1.0 if kind == "prn" else None


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise PRNError(f"unknown model kind {kind!r}; expected {', '.join(KINDS)}")
    return kind


def build(kind: str, cfg: PRNConfig, *, pretrained: bool = True) -> nn.Module:
    """An empty model of ``kind``; ``pretrained=False`` skips the encoder's ImageNet weights (a
    checkpoint will supply them)."""
    check_kind(kind)
    if kind != "prn" and cfg.model.tiles > 1:
        raise PRNError(f"tiles are PRN's (model.tiles {cfg.model.tiles}); {kind} sees the whole image: use tiles 1")
    if kind == "prn":
        from prn.model.network import PRN
        model = cfg.model if pretrained else cfg.replace(backbone_weights="random").model
        return PRN.from_config(model)
    if kind == "patchcore":
        from prn.baselines.patchcore import build_patchcore
        return build_patchcore(cfg, pretrained=pretrained)
    from prn.baselines.prototype_map import build_prototype_map
    return build_prototype_map(cfg, pretrained=pretrained)


def fit(kind: str, cfg: PRNConfig, split, run_dir: Path, *, progress: bool = True,
        resume: bool = False, init_from: Path | None = None) -> FitResult:
    """Fit a model of ``kind`` on ``split``, in ``run_dir`` (PRN keeps its per-epoch checkpoints
    there; ``resume`` continues them; ``init_from`` starts from a checkpoint's weights)."""
    check_kind(kind)
    if init_from is not None and kind != "prn":
        raise PRNError(f"only prn models are retrained from a checkpoint, not {kind}")
    if kind == "prn":
        from prn.train import train
        result = train(cfg, split, run_dir, resume=resume, progress=progress, init_from=init_from)
        extra = {"selected_epoch": result.epoch, "select_epoch": cfg.training.select_epoch}
        # what the fit decided from its data: the memory (for the calibration to record) and
        # whether the simulated anomalies were drawn as thin strokes too, and why
        for event, key in (("defect memory", "defect_memory"), ("strokes", "strokes")):
            found = [h for h in result.history if h.get("event") == event]
            if found:
                extra[key] = {k: v for k, v in found[-1].items() if k not in ("event", "seconds")}
        return FitResult(result.model, result.history, result.epoch, result.validation, extra, result.phases)
    return _fit_unsupervised(kind, cfg, split, progress)


def _fit_unsupervised(kind: str, cfg: PRNConfig, split, progress: bool) -> FitResult:
    """PatchCore and the prototype map learn from the normal training images alone; the seen
    anomalies are still removed from the test set, so every kind is tested on the same images."""
    from prn.data.datasets import load_arrays, load_validation
    from prn.infer import validate
    from prn.preprocess import batches_of
    from prn.runtime import resolve_device, seed_everything, timed

    device = resolve_device(cfg.runtime.device)
    # as train() does for PRN: an encoder built without pretrained weights (backbone_weights
    # random) draws them from the global generator, so without this the same config gave
    # another model after whatever ran before it in the process
    seed_everything(cfg.training.seed)
    phases: dict[str, float] = {}
    with timed(phases, "load images"):
        normals, _ = load_arrays(split.train_normal, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)
    model = build(kind, cfg).to(device)
    batches = (b.to(device) for b in batches_of(normals, cfg.runtime.eval_batch_size))
    t0 = time.perf_counter()
    if kind == "patchcore":
        model.fit(batches)
        event, extra = "memory_bank", {"bank_size": int(model.memory_bank.shape[0])}
    else:
        model.fit_prototypes(batches, seed=cfg.training.seed)
        event, extra = "prototypes", {}
    seconds = time.perf_counter() - t0
    if progress:
        print(f"{kind}: fitted on {len(normals)} normal images in {seconds:.1f} s")
    phases[event.replace("_", " ")] = seconds
    model.eval()
    with timed(phases, "load images"):
        val = load_validation(cfg, split)
    with timed(phases, "validation"):
        outputs = None if val is None else validate(model, val, device, cfg.runtime.eval_batch_size,
                                                    cfg.training.precision)[1]
    return FitResult(model, [{"event": event, "seconds": seconds}], 0, outputs,
                     {"n_normal": len(normals), **extra}, phases)


def save_model(run_dir: str | Path, kind: str, cfg: PRNConfig, result: FitResult,
               calibration: dict | None) -> Path:
    """``checkpoints/model.pt``: the weights that test, predict, serve and export use, with their
    calibration and the config without its runtime section; copied anywhere alone, it predicts
    and decides as its run does."""
    return save_checkpoint(Path(run_dir) / "checkpoints" / "model.pt", model=kind,
                           config=cfg.to_dict(runtime=False), state_dict=result.model.state_dict(),
                           epoch=result.epoch, history=result.history, extra=result.extra,
                           calibration=calibration)
