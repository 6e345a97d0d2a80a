"""``prn <verb>``: a thin command line over prn.api (verbs after anomalib's: fit, test, predict)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from prn.config import BACKBONES, DATASETS, PRESETS, PRNConfig
from prn.errors import PRNError

# Flags every config-building verb takes, mapped to PRNConfig fields.
COMMON_FLAGS = {
    "dataset": dict(choices=DATASETS, help="dataset layout"),
    "root": dict(help="dataset root folder"),
    "category": dict(help="category (sub-dataset), e.g. bottle, Class1, 01"),
    "backbone": dict(choices=BACKBONES, help="encoder (tf_efficientnet_lite0 works offline)"),
    "backbone_weights": dict(help="'imagenet', 'random' or a state-dict file"),
    "image_size": dict(type=int, help="images are resized to this square size (the long side with "
                                       "--set keep_aspect=true)"),
    "seen_anomalies": dict(type=int, help="k seen anomalies moved from test to train (0, 1, 5, 10)"),
    "epochs": dict(type=int),
    "batch_size": dict(type=int, help="split 2:1:1 into normal / extended / simulated"),
    "steps_per_epoch": dict(type=int, help="0: one pass over the normal images"),
    "seed": dict(type=int),
    "device": dict(help="auto, cpu, cuda, cuda:N"),
    "output_dir": dict(help="where run folders are made (default runs/)"),
    "texture_dir": dict(help="DTD-like folder of textures for heterologous anomalies"),
}


def _parse_value(text: str):
    return yaml.safe_load(text)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a config.yaml (e.g. from an earlier run)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="budget preset: paper (GPU) or cpu")
    for name, kw in COMMON_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field, e.g. --set use_attention=false (repeatable)")


def config_from_args(args: argparse.Namespace) -> PRNConfig:
    data = PRNConfig().to_dict()
    if args.config:
        data.update(PRNConfig.load(args.config).to_dict())
    if args.preset:
        data.update(PRESETS[args.preset])
    for name in COMMON_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    known = {f.name for f in fields(PRNConfig)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise PRNError(f"--set {item!r}: expected KEY=VALUE with KEY one of the config fields "
                           f"({', '.join(sorted(known))})")
        data[key] = _parse_value(value)
    return PRNConfig.from_dict(data)


def cmd_fit(args) -> None:
    from prn import api
    if args.resume:
        run = api.resume(args.resume, epochs=args.epochs, progress=not args.quiet)
    else:
        cfg = config_from_args(args)
        if not cfg.root:
            raise PRNError("--root is required (the dataset folder)")
        run = api.fit(cfg, run_dir=args.run_dir, progress=not args.quiet, model=args.model)
    print(f"run folder: {run}")
    if args.test:
        _print_metrics(api.test(run, progress=not args.quiet))


def cmd_test(args) -> None:
    from prn import api
    metrics = api.test(args.run, out_dir=args.out, save_maps=args.save_maps, overlays=args.overlays,
                       progress=not args.quiet, device=args.device)
    _print_metrics(metrics)


def cmd_predict(args) -> None:
    from prn import api
    out = api.predict(args.run, args.input, args.out, threshold=args.threshold, overlays=args.overlays,
                      progress=not args.quiet, device=args.device)
    print(f"scores: {out / 'scores.csv'}\nmaps:   {out / 'maps'}")


def cmd_demo(args) -> None:
    from prn.demo import run_demo
    run = run_demo(args.out, quick=args.quick, progress=not args.quiet)
    print(f"demo run folder: {run}\nreport: {run / 'results.md'}\npictures: {run / 'images'}")


def cmd_show_anomalies(args) -> None:
    from prn.demo import show_anomalies_for_config
    cfg = config_from_args(args)
    paths = show_anomalies_for_config(cfg, Path(args.out), n=args.n, seed=args.seed_show)
    for p in paths:
        print(p)


def cmd_benchmark(args) -> None:
    from prn.benchmark import run_benchmark
    cfg = config_from_args(args)
    table = run_benchmark(cfg, model=args.model, categories=args.categories, out_dir=args.out,
                          ablation=args.ablation, progress=not args.quiet)
    print(table)


def _print_metrics(metrics: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prn", description="Prototypical Residual Network: supervised anomaly detection and localization")
    parser.add_argument("--version", action="version", version=f"prn {__import__('prn').__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("fit", help="split the data, fit prototypes, train PRN")
    add_config_args(p)
    p.add_argument("--run-dir", type=Path, help="run folder (default runs/<dataset>/<category>/<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--model", choices=("prn", "patchcore", "prototypes"), default="prn",
                   help="prn (trained); prototypes: PRN's residual map alone, trains nothing; patchcore")
    p.add_argument("--test", action="store_true", help="test on the held-out split afterwards")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("test", help="evaluate a run on its held-out test split")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt")
    p.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    p.add_argument("--save-maps", action="store_true", help="also write every anomaly map as .npy")
    p.add_argument("--overlays", type=int, default=8, help="heat-map pictures to write (0: none)")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score new images: scores.csv and maps/*.npy")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt")
    p.add_argument("input", type=Path, help="an image or a folder of images")
    p.add_argument("--out", type=Path, default=Path("predictions"))
    p.add_argument("--threshold", type=float, help="decision threshold (default: the run's F1-max one)")
    p.add_argument("--overlays", action="store_true", help="also write heat-map pictures")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="offline demo: synthetic data, short fit, test, report, pictures")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="a smaller, faster schedule (for smoke tests)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("show-anomalies", help="picture grids of the generated training anomalies")
    add_config_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/anomalies"))
    p.add_argument("--n", type=int, default=6, help="examples per strategy")
    p.add_argument("--seed-show", type=int, default=0)
    p.set_defaults(func=cmd_show_anomalies)

    p = sub.add_parser("benchmark", help="fit and test every category; paper-style tables")
    add_config_args(p)
    p.add_argument("--model", choices=("prn", "patchcore", "prototypes"), default="prn",
                   help="prn; patchcore (baseline); prototypes (PRN's residual |F - P*| alone, trains nothing)")
    p.add_argument("--categories", nargs="*", help="default: all categories of the dataset")
    p.add_argument("--ablation", choices=("table4", "table5", "table6", "table7"),
                   help="run every variant of one of the paper's ablation tables")
    p.add_argument("--out", type=Path, help="table folder (default <output_dir>/benchmark/...)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PRNError, ValueError, OSError) as exc:
        # Input and environment problems are reported as one line; PRN_DEBUG=1 shows the traceback.
        if os.environ.get("PRN_DEBUG"):
            raise
        print(f"prn {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prn {args.verb}: interrupted; the last checkpoint is intact "
              f"(continue with `prn fit --resume RUN_DIR`)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
