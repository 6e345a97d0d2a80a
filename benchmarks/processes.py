"""Training images/s of one model on 1 and 2 CPU processes (torchrun).

    python benchmarks/processes.py /tmp/processes

The demo's data and config (`prn demo`: 128 px, EfficientNet-Lite0, batch 16, DataLoader workers
sized automatically) for 1 epoch of 6 steps, started as `prn fit` with torch's default threads,
as `prn fit` with OMP_NUM_THREADS=1, and under `torchrun --standalone --nproc_per_node 2`
(one thread per process, torchrun's default). Images/s are the epoch's steps x batch over its
seconds in metrics.csv (prototypes and start-up excluded); wall seconds include them. Prints a
markdown table with the load average at each start; writes processes.json.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prn.data.demo import make_demo_dataset
from prn.demo import demo_config

LAUNCHES = {
    "1 process, default threads": ([sys.executable, "-m", "prn"], {}),
    "1 process, OMP_NUM_THREADS=1": ([sys.executable, "-m", "prn"], {"OMP_NUM_THREADS": "1"}),
    "2 processes (torchrun), 1 thread each": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "prn"], {}),
}


def main(out: Path) -> list[dict]:
    make_demo_dataset(out / "data", seed=0)
    cfg = demo_config(out).replace(epochs=1, steps_per_epoch=6, device="cpu")
    cfg.save(out / "config.yaml")
    rows = []
    for name, (launcher, env) in LAUNCHES.items():
        run = out / name.split(",")[0].replace(" ", "_") / str(len(rows))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run([*launcher, "fit", "--config", str(out / "config.yaml"), "--run-dir", str(run), "--quiet"],
                       check=True, env=dict(os.environ, **env), capture_output=True)
        wall = time.perf_counter() - t0
        record = list(csv.DictReader((run / "metrics.csv").open()))[-1]
        rows.append({"launch": name, "load_average": round(load, 1), "wall_seconds": round(wall, 1),
                     "images_per_s": round(int(record["steps"]) * cfg.training.batch_size / float(record["seconds"]), 2)})
    print("| launch | load average | training images/s | wall s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['launch']} | {r['load_average']} | {r['images_per_s']} | {r['wall_seconds']} |")
    (out / "processes.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/processes"))
