"""``prn predict`` over many processes and machines: torchrun shards the input list by rank.

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint host:29500 \\
        -m prn predict RUN /shared/incoming --out /shared/out --maps none

Every rank lists the input folder itself (the sorted list ``prn predict`` makes in one process)
and scores the files rank, rank + N, ... of it into ``OUT/.rank-<r>/``; when all are done (the
sum of their counts is the meeting point), rank 0 merges the parts: one ``scores.csv`` and one
``regions.jsonl`` in the input order, byte for byte what one process writes; the maps, masks and
pictures moved into ``OUT``; the rank folders removed. On several machines the input and output
folders must be one shared file system (NFS, a mounted bucket); the model is loaded by each rank.
With ``--engine onnx`` rank 0 exports the graph (when needed) before the others read it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import torch

from prn import distributed
from prn.deploy.predict import PredictSummary, Predictor, check_appearance, input_files, predict_folder
from prn.report import REGIONS_FILE, shown_path
from prn.runtime import resolve_device

RANK_DIR = ".rank-{}"


def predict_sharded(run: str | Path, inputs: str | Path, out_dir: str | Path, *, device: str | None = None,
                    threshold: float | None = None, progress: bool = True, batch_size: int | None = None,
                    **options) -> PredictSummary:
    """This rank's share of ``predict_folder``; rank 0 merges and returns the whole run's summary,
    the others their part's. ``options``: those of ``predict_folder``."""
    t0 = time.perf_counter()
    w, dev = distributed.setup(resolve_device(device or "auto"))
    predictor = Predictor(run, device=str(dev), threshold=threshold, batch_size=batch_size)
    if options.get("engine") == "onnx":
        from prn.deploy.engine import ensure_exported
        if w.rank == 0:
            ensure_exported(predictor, progress)
        distributed.barrier()
    out = Path(out_dir)
    part = out / RANK_DIR.format(w.rank)
    if part.exists():
        shutil.rmtree(part)  # left by an interrupted launch
    mine = predict_folder(predictor, inputs, part, shard=(w.rank, w.size), progress=progress and w.rank == 0,
                          **options)
    # every rank has closed its files once it gets past this sum
    n_images, n_defective, n_errors, n_review = (int(v) for v in distributed.sum_over_ranks(
        torch.tensor([mine.n_images, mine.n_defective, mine.n_errors, mine.n_review or 0], dtype=torch.int64)))
    looks = distributed.gather_rows(torch.from_numpy(mine.looks)).numpy()
    if w.rank != 0:
        return mine
    merge(out, w.size, Path(inputs))
    regions = out / REGIONS_FILE if mine.regions is not None else None
    return PredictSummary(out, out / "scores.csv", n_images, n_defective, n_errors,
                          time.perf_counter() - t0, mine.decided, regions,
                          None if mine.n_review is None else n_review,
                          check_appearance(predictor, looks, out), looks)


def merge(out: Path, size: int, inputs: Path) -> None:
    """The ranks' parts under ``out`` as one process would have written them."""
    files, root = input_files(inputs)
    order = {shown_path(f, root): i for i, f in enumerate(files)}
    parts = [out / RANK_DIR.format(r) for r in range(size)]
    header, rows, lines = None, [], []
    for part in parts:
        with (part / "scores.csv").open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            rows += list(reader)
        if (part / REGIONS_FILE).is_file():
            lines += (part / REGIONS_FILE).read_text().splitlines()
    rows.sort(key=lambda row: order[row[0]])
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    if lines:
        lines.sort(key=lambda line: order[json.loads(line)["path"]])
        (out / REGIONS_FILE).write_text("".join(line + "\n" for line in lines))
    for part in parts:
        for path in sorted(part.rglob("*")):
            if path.is_file() and path.parent != part:  # maps/, masks/, images/
                dest = out / path.relative_to(part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
        shutil.rmtree(part)
