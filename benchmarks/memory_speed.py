"""What the memory of the seen defects costs a forward pass (prn.model.defect_memory).

    OMP_NUM_THREADS=1 python benchmarks/memory_speed.py RUN [--batch 8] [--rounds 6]

Loads the run (its ``model.pt`` must hold a memory: ``prn calibrate RUN --defect-memory on``
gives one), and times the model's forward pass on a batch of random inputs at the run's input size
with its memory and with it cleared, alternately (the first round is a warm-up): median and best
milliseconds per image of each, and the number of remembered features. Figures depend on the
machine's load: say which when you quote them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from prn.deploy.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--batch", type=int, default=8, help="images a pass (default 8, predict's)")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    loaded = load_model(args.run, device="cpu")
    memory = getattr(loaded.model, "defect_memory", None)
    if memory is None or not memory.built:
        raise SystemExit(f"{args.run}: its model holds no memory of the seen defects "
                         f"(prn calibrate {args.run} --defect-memory on builds one)")
    features, standard = memory.features.clone(), memory.standard.clone()
    x = torch.rand(args.batch, 3, *loaded.cfg.model.input_hw, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"with the memory": [], "without": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name in times:
                if name == "without":
                    memory.clear()
                else:
                    memory.set(features, standard)
                t0 = time.perf_counter()
                loaded.model(x)
                times[name].append(1000 * (time.perf_counter() - t0) / args.batch)
    print(f"{args.run}: {len(features)} remembered features, input {tuple(loaded.cfg.model.input_hw)}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    for name, ms in times.items():
        kept = ms[1:] or ms  # the first round warms up
        print(f"| {name} | median {statistics.median(kept):.1f} ms per image | best {min(kept):.1f} |")


if __name__ == "__main__":
    main()
