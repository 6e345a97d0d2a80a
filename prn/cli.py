"""``prn <verb>``: a thin command line over prn.api (verbs after anomalib's: fit, test, predict)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prn.config import CALIBRATION_TAILS, MEMORY_MODES, PRECISIONS, SEEN_ANNOTATIONS, TEST_FLIPS
from prn.errors import CheckpointError, DataError, ExitStatus, PRNError, UsageError
from prn.settings import COMMON_FLAGS, add_config_args, config_from_args


def _flags_resume_would_ignore(args: argparse.Namespace) -> list[str]:
    given = [flag for flag, on in (("--config", args.config), ("--preset", args.preset),
                                   ("--run-dir", args.run_dir), ("--overwrite", args.overwrite),
                                   ("--model", args.model)) if on]
    given += ["--" + name.replace("_", "-") for name in COMMON_FLAGS
              if name != "epochs" and getattr(args, name, None) is not None]
    return given + [f"--set {item}" for item in args.set]


def cmd_fit(args) -> None:
    from prn import api, distributed
    from prn.runs import check_run_dir
    if (args.add_anomalies or args.add_normals) and not args.parent:
        raise UsageError("--add-anomalies and --add-normals go with --from RUN (the run to retrain)")
    if args.added_annotation != "as_given" and not args.add_anomalies:
        raise UsageError("--added-annotation goes with --add-anomalies (how the added defects are trained)")
    if args.parent:
        from prn.retrain import RETRAIN_SECTIONS, added_summary, fit_from
        from prn.settings import parse_sets
        ignored = [f for f in _flags_resume_would_ignore(args)
                   if f not in ("--run-dir", "--root") and not f.startswith("--set")]
        if ignored or args.resume:
            raise UsageError(f"--from {args.parent} retrains with that run's config and split, so "
                             f"{', '.join(ignored + (['--resume'] if args.resume else []))} would be ignored; "
                             f"--add-anomalies, --add-normals, --epochs, --set (training and calibration "
                             f"settings), --root (where its data set is now, if it moved), --run-dir, "
                             f"--test and --quiet go with --from")
        run = fit_from(args.parent, add_anomalies=args.add_anomalies, add_normals=args.add_normals,
                       epochs=args.epochs, run_dir=args.run_dir, progress=not args.quiet,
                       changes=parse_sets(args.set, RETRAIN_SECTIONS), added_annotation=args.added_annotation,
                       root=args.root)
        print(f"run folder: {run}")
        judged = json.loads((run / "parent.json").read_text()).get("judged_not_good") or []
        if judged:
            print(f"prn fit --from: {len(judged)} of the parent's held-out good images came back as defects: "
                  f"{', '.join(judged)}; trained as defects, and left out of the held-out fold the "
                  f"thresholds are set on (split.json not_good)")
        decided = run / "added_decisions.json"
        print("prn fit --from: " + added_summary(json.loads(decided.read_text()) if decided.is_file() else None,
                                                 by_region=args.added_annotation != "label"))
        if args.test:
            _print_metrics(api.test(run, progress=not args.quiet), "fit")
        return
    if args.resume:
        ignored = _flags_resume_would_ignore(args)
        if ignored:
            raise UsageError(f"--resume {args.resume} continues the run with its own config.yaml and "
                             f"split.json, so {', '.join(ignored)} would be ignored; only --epochs "
                             f"(a longer schedule), --test and --quiet go with --resume")
        if not (args.resume / "config.yaml").is_file():
            raise CheckpointError(f"{args.resume}: not a run folder (no config.yaml) to resume")
        run = api.resume(args.resume, epochs=args.epochs, progress=not args.quiet)
    else:
        cfg = config_from_args(args)
        if not cfg.data.root:
            raise UsageError("--root is required (the dataset folder)")
        if args.overwrite and not args.run_dir:
            raise UsageError("--overwrite goes with --run-dir (new run folders are always new)")
        # Under torchrun rank 0 alone checks (and with --overwrite empties) the folder it writes.
        run_dir = (check_run_dir(args.run_dir, overwrite=args.overwrite)
                   if args.run_dir and distributed.is_main() else args.run_dir)
        run = api.fit(cfg, run_dir=run_dir, progress=not args.quiet, model=args.model or "prn")
    if not distributed.is_main():
        return  # rank 0 reports and tests
    print(f"run folder: {run}")
    if args.test:
        _print_metrics(api.test(run, progress=not args.quiet), "fit")


def cmd_test(args) -> None:
    from prn import api
    # -1 (all): more than any test set holds, since api.test takes a count
    overlays = args.overlays if args.overlays >= 0 else sys.maxsize
    metrics = api.test(args.run, out_dir=args.out, save_maps=args.save_maps, overlays=overlays,
                       progress=not args.quiet, device=args.device, root=args.root)
    _print_metrics(metrics, "test")


def cmd_predict(args) -> int | None:
    from prn import api, distributed
    summary = api.predict(args.run, args.input, args.out, threshold=args.threshold, maps=args.maps,
                          masks=args.masks, overlays=args.overlays, strict=args.strict,
                          num_workers=args.workers, progress=not args.quiet, device=args.device,
                          require_decision=args.fail_on_defect, min_region_area=args.min_region_area,
                          engine=args.engine, batch_size=args.batch_size)
    if not distributed.is_main():
        return None  # rank 0 merged the parts and speaks for the run
    review = getattr(summary, "n_review", None)
    judged = (f"{summary.n_defective} judged defective"
              + ("" if review is None else f", {review} passed to review") if summary.decided else
              "no decision made (the model has no calibrated threshold: prn calibrate RUN, or --threshold T)")
    regions = getattr(summary, "regions", None)
    print(f"{summary.n_images} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f}/s): "
          f"{judged}, {summary.n_errors} unreadable\n"
          f"scores: {summary.csv}" + (f"\nregions: {regions}" if regions else ""))
    if not summary.decided:
        print("prn predict: warning: no part was judged: the model has no threshold", file=sys.stderr)
    if regions is None and hasattr(summary, "regions"):
        print("prn predict: warning: no defect regions: the model has no calibrated pixel threshold "
              "(prn calibrate RUN); the regions column is empty and no regions.jsonl was written",
              file=sys.stderr)
    if summary.n_errors:
        print(f"prn predict: warning: {summary.n_errors} unreadable file(s), listed with their error "
              f"in {summary.csv}", file=sys.stderr)
    look = getattr(summary, "appearance", None)
    if look and look["message"]:
        print(f"prn predict: warning: {look['message']}", file=sys.stderr)
    if args.fail_on_defect and summary.n_defective:
        return ExitStatus.DEFECT  # the exit status a line script acts on (README: exit statuses)


def cmd_compare(args) -> None:
    from prn.retrain import compare, compare_table
    result = compare(args.run_a, args.run_b, args.data, device=args.device)
    print(compare_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def cmd_calibrate(args) -> None:
    from prn.deploy.calibrate import calibrate_run
    cal = calibrate_run(args.run, target_fpr=args.target_fpr, pixel_target_fpr=args.pixel_target_fpr,
                        tail=args.tail, device=args.device, precision=args.precision,
                        defect_memory=args.defect_memory, test_flips=args.test_flips,
                        defect_memory_stride=args.defect_memory_stride, review_fpr=args.review_fpr,
                        good_images=args.good_images, not_good=args.not_good or (),
                        good_again=args.good_again or (), root=args.root, progress=not args.quiet)
    if cal is None:
        raise DataError(f"{args.run}: split.json holds no held-out normal images (val_normal), "
                       f"so there is nothing to calibrate on; --good-images DIR gives good parts to calibrate on")
    _print_metrics(cal, "calibrate", args.run)


def cmd_export(args) -> None:
    from prn import api
    from prn.deploy.export import read_metadata
    path = api.export(args.run, args.format, args.out)
    meta = read_metadata(path)
    decision = (f"threshold {float(meta['image_threshold']):.6g} (calibrated)"
                if meta["calibrated"] == "true" else "no calibration in the checkpoint: map and score only")
    size = f"{meta['input_height']} x {meta['input_width']}"
    shape = (f"at {size} exactly (resize first, as docs/deploy.md says; weights in {path.with_suffix('.bin').name})"
             if args.format == "openvino" else f"resized to {size}")
    print(f"{args.format}: {path}\n{meta['model_kind']} on {meta['backbone']}, input uint8 RGB "
          f"(batch, 3, H, W), {shape}; {decision}")


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
    from prn import distributed
    from prn.benchmark import JobsFailed, run_benchmark
    cfg = config_from_args(args)
    try:
        table = run_benchmark(cfg, model=args.model, categories=args.categories, out_dir=args.out,
                              ablation=args.ablation, progress=not args.quiet, jobs=args.jobs)
    except JobsFailed as exc:
        print(exc.table)  # the categories that finished, then the error names the others
        raise
    if distributed.is_main():
        print(table)


def cmd_serve(args) -> None:
    from prn.serve import serve
    serve(args.run, host=args.host, port=args.port, token=args.token, device=args.device,
          threshold=args.threshold, max_request_bytes=round(args.max_request_mb * 2**20),
          max_pixels=args.max_pixels, max_images=args.max_images,
          min_region_area=args.min_region_area,
          corrections=False if args.no_corrections else args.corrections, engine=args.engine)


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535 (--port), refused by argparse with the text given."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return n


def positive_int(text: str, what: str = "a whole number") -> int:
    """A whole number >= 1 (--batch-size), refused by argparse with the text given."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected {what} >= 1, got {text!r}")
    return n


def region_area(text: str) -> int:
    """--min-region-area N: pixels of the image at its own size, a whole number >= 1."""
    return positive_int(text, "a whole number of pixels")


def _print_metrics(metrics: dict, verb: str, run: Path | None = None) -> None:
    """The figures as JSON on stdout; on stderr, after a test, the decision at the calibrated
    threshold in one line, and the threshold's warning, each prefixed with the verb that was run."""
    from prn.deploy.calibrate import calibration_messages, decision_summary, threshold_warning
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=2))
    decided = decision_summary(metrics) if verb != "calibrate" else None
    if decided:
        print(f"prn {verb}: {decided}", file=sys.stderr)
    warning = threshold_warning(metrics)
    said = [("warning", warning)] if warning else []
    if verb == "calibrate":  # what it says of the held-out images, as fit does
        said += calibration_messages(metrics, run)
    for kind, text in said:
        print(f"prn {verb}: {kind}: {text}", file=sys.stderr)


EXIT_STATUSES = """exit statuses:
  0    done
  1    any other error
  2    usage: unknown flag, a value of the wrong type, flags that conflict or would be ignored
  3    prn predict --fail-on-defect: at least one image was judged defective
  4    input data: a dataset, image, mask, input or config file missing, unreadable or wrong
  5    model files: a checkpoint or backbone weights missing, unsafe or incompatible
  6    training stopped (non-finite loss) or the asked-for device is absent
  130  interrupted (Ctrl-C); a fit's last checkpoint is intact, continue with --resume
errors print one line; PRN_DEBUG=1 shows the traceback"""


def overlay_count(text: str) -> int:
    """--overlays N: pictures to write, 0 none, -1 all (the same meaning in test and predict)."""
    try:
        n = int(text)
    except ValueError:
        n = -2
    if n < -1:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, or -1 for all, got {text!r}")
    return n


MOVED_ROOT_HELP = ("where the run's data set is now, if it was moved or copied since the fit: its files "
                   "are looked for under this folder instead of the one split.json names")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prn", description="Prototypical Residual Network: supervised anomaly detection and localization",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prn {__import__('prn').__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("fit", help="split the data, fit prototypes, train PRN")
    add_config_args(p)
    p.add_argument("--run-dir", type=Path,
                   help="run folder, new or empty (default <output_dir>/<dataset>/<category>/<time>, "
                        "with a 'latest' link beside it); a folder holding a run is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="with --run-dir: replace the run already in that folder (its files are deleted)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run with its own config and split; only --epochs "
                        "(a longer schedule), --test and --quiet may go with it, other flags are refused")
    p.add_argument("--model", choices=("prn", "patchcore", "prototypes"),
                   help="prn (trained, the default); prototypes: PRN's residual map alone, trains "
                        "nothing; patchcore")
    p.add_argument("--from", dest="parent", type=Path, metavar="RUN",
                   help="retrain RUN with the images of --add-anomalies / --add-normals: a new run with "
                        "RUN's config and split plus them, started from RUN's weights, a shorter schedule "
                        "(--epochs, default 3; --set for other training or calibration settings, e.g. "
                        "lr); it records its parent in parent.json")
    p.add_argument("--add-anomalies", type=Path, metavar="DIR",
                   help="with --from: defects to learn, DIR/test/<kind>/ with ground_truth/<kind>/<stem>_mask.png "
                        "(or _box.png, or none: a label alone), as prn serve's corrections folder is")
    p.add_argument("--added-annotation", choices=SEEN_ANNOTATIONS, default="as_given",
                   help="with --add-anomalies: train the added defects by what they come with (as_given: "
                        "mask, box or label), each painted mask as the box around it (box), or by their "
                        "label alone, masks unused (label)")
    p.add_argument("--add-normals", type=Path, metavar="DIR",
                   help="with --from: good images to learn, DIR/train/good/ (or DIR itself)")
    p.add_argument("--test", action="store_true", help="test on the held-out split afterwards")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("compare", help="two models' decisions side by side on a labelled folder")
    p.add_argument("run_a", type=Path, help="run folder or checkpoint .pt (e.g. the model in service)")
    p.add_argument("run_b", type=Path, help="run folder or checkpoint .pt (e.g. the retrained one)")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled images: those under a folder named good or ok are good, the others defective "
                        "(masks under ground_truth/ left out: a corrections folder is one)")
    p.add_argument("--json", type=Path, help="also write every image's scores and decisions as JSON")
    p.add_argument("--device")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("test", help="evaluate a run on its held-out test split")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt")
    p.add_argument("--out", type=Path, help="output folder (default: the run folder)")
    p.add_argument("--save-maps", action="store_true", help="also write every anomaly map as .npy")
    p.add_argument("--overlays", type=overlay_count, default=8, metavar="N",
                   help="heat-map pictures of N test images, the highest-scoring defective and good "
                        "ones (0: none, -1: all; default 8)")
    p.add_argument("--root", type=Path, metavar="FOLDER", help=MOVED_ROOT_HELP)
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score new images: scores.csv, maps, masks, pictures",
                       description="Score an image or a folder of images (streamed, flat memory). "
                                   "scores.csv: path, score, normalized_score (0.5 = threshold), "
                                   "prediction (1 = defective), error (unreadable files), regions "
                                   "(their count); regions.jsonl: each image's defect regions "
                                   "(boxes in its own pixels, area, peak and mean score).")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt (a bare copy decides the same)")
    p.add_argument("input", type=Path, help="an image or a folder of images")
    p.add_argument("--out", type=Path, default=Path("predictions"))
    p.add_argument("--threshold", type=float,
                   help="image decision threshold (default: the one calibrated at fit, in the checkpoint)")
    p.add_argument("--maps", choices=("npy", "png", "none"), default="npy",
                   help="anomaly maps at each image's size: float32 .npy, 8-bit .png (128 = pixel "
                        "threshold), or none (default npy)")
    p.add_argument("--masks", action="store_true", help="binary defect masks as PNG (pixel threshold)")
    p.add_argument("--overlays", type=overlay_count, default=0, metavar="N",
                   help="heat-map pictures of the first N images (0: none, -1: all; default 0)")
    p.add_argument("--fail-on-defect", action="store_true",
                   help="exit with status 3 when any image is judged defective")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable file (default: report it in scores.csv, go on)")
    p.add_argument("--min-region-area", type=region_area, default=1, metavar="PIXELS",
                   help="defect regions (regions.jsonl, the regions column) of at least this many "
                        "pixels of the image at its own size (default 1: every region)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0: in process, "
                   "the next batch decoded in a thread while the model runs)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="what runs the model: torch, or onnxruntime on the run's exported graph "
                        "(RUN/export/model.onnx, exported on first use; needs the export extra)")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="images per forward pass (default: eval_batch_size, 8); the peak memory "
                        "grows with it")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("calibrate", help="set a run's thresholds again on its held-out good images",
                       description="Thresholds from the run's held-out fold (split.json val_normal), "
                                   "never test data; stored in the checkpoint and calibration.json. "
                                   "fit does this itself; use it to change the target rate.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--target-fpr", type=float, help="share of good parts rejected (default: the config's, 0.01)")
    p.add_argument("--pixel-target-fpr", type=float, help="share of good pixels marked (default 0.001)")
    p.add_argument("--review-fpr", type=float,
                   help="open a review band under the image threshold, down to the threshold of this share "
                        "of good parts (e.g. 0.05): parts there pass but are marked for a person "
                        "(scores.csv's review column); 0 removes the band (default: the config's, 0)")
    p.add_argument("--tail", choices=CALIBRATION_TAILS,
                   help="distribution fitted to the held-out scores when they are too few for a "
                        "quantile (default: the config's, gumbel; gumbel_logit fits it to the scores' "
                        "logits, PRN only)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="infer at this precision from now on (test, predict, serve): the held-out fold is "
                        "scored at it; auto: bf16 where the device computes it natively "
                        "(default: the run's training precision)")
    p.add_argument("--defect-memory", choices=MEMORY_MODES,
                   help="build the memory of the seen defects anew from the run's split before calibrating "
                        "(auto: only where they recognise one another), or remove it (off); no refit")
    p.add_argument("--defect-memory-stride", type=int, choices=(4, 2),
                   help="build the memory anew matching at 1/4 of the input (the encoder's finest tap) or "
                        "1/2 (its 1/2 map too, for defects under 16 pixels); with the run's --defect-memory "
                        "setting unless given; no refit")
    p.add_argument("--test-flips", choices=tuple(TEST_FLIPS),
                   help="from now on average each map with those of the mirrored image: lr (left-right, "
                        "twice the inference time), ud, all (four times), none; the fold is scored so; no refit")
    p.add_argument("--good-images", type=Path, metavar="DIR",
                   help="a folder of more good parts (e.g. from the line since the fit), never trained on and "
                        "outside the run's split, to set the thresholds on with the held-out good images: the "
                        "more good parts, the nearer the threshold lands to its target rate")
    p.add_argument("--not-good", nargs="+", type=Path, metavar="IMAGE",
                   help="held-out good images you judged not good (e.g. named by the warning of a fit), left "
                        "out of the thresholds from now on, without a refit; split.json lists them under not_good")
    p.add_argument("--good-again", nargs="+", type=Path, metavar="IMAGE",
                   help="images given to --not-good before that are good after all: back into the held-out fold")
    p.add_argument("--root", type=Path, metavar="FOLDER", help=MOVED_ROOT_HELP)
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="the model as one ONNX, TorchScript or OpenVINO file that runs without prn",
                       description="The whole inference path in one graph with a dynamic batch: uint8 "
                                   "RGB images of any size in; resize, encoder, prototypes, head, map, "
                                   "image score out, plus the normalised score and the decision when "
                                   "the checkpoint is calibrated. Input size, model kind, thresholds "
                                   "in the file's metadata. openvino: OpenVINO's IR (model.xml and "
                                   "model.bin) at the model's input size, the images resized first. "
                                   "See docs/deploy.md.")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt")
    p.add_argument("--format", choices=("onnx", "torchscript", "openvino"), default="onnx", help="default onnx")
    p.add_argument("--out", type=Path, help="file to write (default RUN/export/model.onnx, "
                                            "model.torchscript.pt or model.xml; beside a .pt given as RUN)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="offline demo: synthetic data, short fit, test, report, pictures")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="folder of the demo: <out>/data (the dataset), <out>/<time> (each run), "
                        "<out>/latest (the newest run); default runs/demo")
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
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="fit J categories side by side, one process each, on the CUDA devices in turn "
                        "(or the CPU); a failed one is reported and the others finish (default 1)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("serve", help="an HTTP inspection service with a web page (needs prn[serve])",
                       description="Load a model once and serve it: the page at /, POST /predict "
                                   "(multipart field 'files'; ?overlay=1, ?mask=1; defect regions "
                                   "in each result), POST /corrections, GET /corrections, GET "
                                   "/corrections.zip, GET /model, GET /health, API docs at /docs. "
                                   "Decisions use the checkpoint's calibrated thresholds, as prn "
                                   "predict does. See docs/serve.md.")
    p.add_argument("run", type=Path, help="run folder or checkpoint .pt")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; any other "
                        "needs --token)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--token", help="every request must carry it (Authorization: Bearer TOKEN; "
                                   "browsers: open /?token=TOKEN once); default $PRN_SERVE_TOKEN")
    p.add_argument("--threshold", type=float,
                   help="image decision threshold (default: the calibrated one in the checkpoint)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (default 32)")
    p.add_argument("--max-pixels", type=int,
                   help="largest image, width x height (default: the model's max_image_pixels)")
    p.add_argument("--max-images", type=int, default=16, help="most images in one request (default 16)")
    p.add_argument("--min-region-area", type=region_area, default=1, metavar="PIXELS",
                   help="defect regions returned by /predict: at least this many pixels of the image "
                        "(default 1: every region; ?min_region_area=N per request)")
    p.add_argument("--corrections", type=Path, metavar="DIR",
                   help="where the page's corrections are stored, in the MVTec layout (default: "
                        "RUN/corrections for a run folder, corrections/ beside a bare checkpoint)")
    p.add_argument("--no-corrections", action="store_true",
                   help="no corrections: the page hides 'wrong?', nothing is ever written to disk")
    p.add_argument("--device")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="what runs the model: torch, or onnxruntime on the run's exported graph")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns its exit status (EXIT_STATUSES). argparse itself exits with 2 on a
    malformed command line."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except (PRNError, ValueError, OSError) as exc:
        # Input and environment problems are reported as one line; PRN_DEBUG=1 shows the traceback.
        if os.environ.get("PRN_DEBUG"):
            raise
        from prn.distributed import rank_label, report_failure
        print(f"prn {args.verb}{rank_label()}: error: {exc}", file=sys.stderr)
        report_failure(exc)  # under torchrun: the message its summary quotes
        if isinstance(exc, PRNError):
            return int(exc.exit_status)
        return int(ExitStatus.DATA if isinstance(exc, OSError) else ExitStatus.ERROR)
    except KeyboardInterrupt:
        print(f"prn {args.verb}: interrupted; the last checkpoint is intact "
              f"(continue with `prn fit --resume RUN_DIR`)", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    return int(status or ExitStatus.OK)


# The status a command ends with once ``main`` has returned; None before (an uncaught exception,
# argparse's own exit), and then Python's whole teardown runs as usual.
_STATUS: int | None = None


def _skip_teardown() -> None:
    """The last exit handler of a ``prn`` command: once the others have run (logging's flush,
    temporary folders, torch.distributed's group, multiprocessing's children; Python has joined
    the other threads before them), end the process without Python's teardown of every module
    and the destructors of torch's libraries.

    Why: that teardown took half a second to a second after every command and paged in about
    130 MB of torch's libraries, which was `prn predict`'s peak resident set (BENCHMARKS.md, "The
    exit after a command"); the operating system frees the process's memory at once anyway. Open
    files are the writers' own, closed when each command finished with them. Handlers registered
    before the command started (a coverage tool's, through a .pth file) would not run:
    ``PRN_FULL_EXIT=1`` keeps the whole teardown."""
    if _STATUS is None or os.environ.get("PRN_FULL_EXIT", "") not in ("", "0"):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`prn ... | head`) or a closed stream
            pass
    os._exit(_STATUS)


def entry() -> None:
    """The ``prn`` command and ``python -m prn``: under tcmalloc where the machine has it
    (prn.allocator; it must be chosen before torch is loaded), then ``main``, then an exit
    without Python's teardown (``_skip_teardown``)."""
    global _STATUS
    from prn.allocator import reexec_for_command
    if sys.argv[1:2] != ["export"]:  # OpenVINO (export --format openvino) aborts under tcmalloc
        reexec_for_command("prn")
    import atexit
    atexit.register(_skip_teardown)  # registered first, so it runs after every other handler
    _STATUS = main()
    sys.exit(_STATUS)


if __name__ == "__main__":
    entry()
