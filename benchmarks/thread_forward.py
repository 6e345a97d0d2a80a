"""How long one forward pass takes depending on the thread that calls it (why serve has a model thread).

    python benchmarks/thread_forward.py [RUN] [--calls 30] [--batch 1]

Times the forward pass at batch ``--batch`` (the run's model, or timm's EfficientNet-Lite0
encoder without a run) called from: a fresh thread before the main thread has used torch, the
main thread, and a fresh thread after the main thread has (as a server that loads its model in
the main thread and runs it in request threads did). With OpenMP, each calling thread keeps its
own team of workers; once there are more of them than cores they stop spinning between operators.
Figures depend on the machine and its load: say which when you quote them.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch


def timed(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1000


def in_thread(fn):
    box = {}
    th = threading.Thread(target=lambda: box.update(v=fn()))
    th.start()
    th.join()
    return box["v"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if args.run:
        from prn.deploy.loading import load_model
        loaded = in_thread(lambda: load_model(args.run, device="cpu"))  # keeps the main thread unused
        model, hw = loaded.model.eval(), loaded.cfg.model.input_hw
    else:
        import timm
        model, hw = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)).eval(), (384, 160)
    x = torch.rand(args.batch, 3, *hw)

    def forward():
        with torch.inference_mode():
            model(x)
    rows = [("a new thread, the main thread unused", in_thread(lambda: timed(forward, args.calls))),
            ("the main thread", timed(forward, args.calls)),
            ("a new thread, after the main thread", in_thread(lambda: timed(forward, args.calls)))]
    print(f"{'run ' + args.run if args.run else 'timm Lite0 encoder'}, input {tuple(hw)}, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads")
    print("| called from | ms per forward |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
