"""``prn demo`` and ``prn show-anomalies``: the offline, self-contained paths through the tool."""

from __future__ import annotations

from pathlib import Path

from prn.config import PRNConfig

# The demo's schedule: sized to finish in a few minutes on a 2-core CPU with the offline backbone.
DEMO_SETTINGS = dict(
    dataset="demo", category="demo", category_kind="texture", backbone="tf_efficientnet_lite0",
    image_size=128, seen_anomalies=5, epochs=10, batch_size=16, steps_per_epoch=20, eval_batch_size=16,
)
QUICK_SETTINGS = dict(image_size=64, epochs=2, steps_per_epoch=4)


def demo_config(out: Path, quick: bool = False) -> PRNConfig:
    settings = dict(DEMO_SETTINGS, **(QUICK_SETTINGS if quick else {}))
    return PRNConfig(root=str(out / "data"), output_dir=str(out), **settings)


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True) -> Path:
    """Build the synthetic dataset, fit PRN, test it, write the report and overlay pictures.

    Layout: ``<out>/data/`` (the dataset, written once and reused), ``<out>/<time>/`` (the
    run) and ``<out>/latest`` pointing at the newest run; the demo's one dataset and category are
    not repeated in the path."""
    from prn import api
    from prn.data.demo import make_demo_dataset
    from prn.report import check_out_folder
    from prn.runs import new_run_dir

    out = check_out_folder(out)
    make_demo_dataset(out / "data", seed=0)
    cfg = demo_config(out, quick)
    run = api.fit(cfg, run_dir=new_run_dir(cfg, parent=out), progress=progress)
    api.test(run, progress=progress, overlays=8)
    return run


def show_anomalies_for_config(cfg: PRNConfig, out: Path, *, n: int = 6, seed: int = 0) -> list[Path]:
    """Picture grids of what the model trains on, for the config's data (or the demo data)."""
    from prn.anomalies.compose import AnomalyGenerator, is_gray
    from prn.anomalies.show import show_anomalies
    from prn.data.demo import make_demo_dataset
    from prn.runs import make_split, resolve_input_size
    from prn.data.datasets import load_training_arrays
    from prn.report import check_out_folder

    check_out_folder(out)
    if not cfg.data.root:
        make_demo_dataset(out / "data", seed=0)
        cfg = cfg.replace(**{k: v for k, v in DEMO_SETTINGS.items() if k in ("dataset", "category")},
                          root=str(out / "data"), seen_anomalies=min(cfg.data.seen_anomalies, 5))
    split = make_split(cfg)
    cfg = resolve_input_size(cfg, split)
    normals, seen = load_training_arrays(cfg, split)
    generator = AnomalyGenerator(cfg, seen, cfg.data.resolved_category_kind, texture_dir=cfg.synthesis.texture_dir or None,
                                 gray=all(is_gray(n) for n in normals[:8]))
    return show_anomalies(normals, generator, out, n=n, seed=seed)
