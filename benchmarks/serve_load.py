"""Load on `prn serve`: concurrent clients against a live server on 127.0.0.1.

    python benchmarks/serve_load.py RUN IMAGES_FOLDER                 # 4 clients, 200 requests
    python benchmarks/serve_load.py RUN IMAGES_FOLDER --overlay       # as the page asks

Starts ``prn serve RUN`` on 127.0.0.1 (only: the script has no host option) on a free port,
waits for /health, then sends POST /predict requests of one image each (the folder's images in
turn) from ``--clients`` threads, each with its own connection: ``--warmup`` requests first, not
measured, then ``--requests`` within ``--time-limit`` seconds. The warm-up goes through the same
concurrent clients because the server's first concurrent requests start its worker threads,
each with its own allocator arena that keeps its high-water mark (on KolektorSDD images, 170 MB
in the first 100 requests without overlays, 270 MB in the first 140 with them, then flat for
500 more); memory measured after that is what a leak would grow. Reported: requests/s over the load phase, p50/p95/max
latency, errors (non-200 answers, failed connections, requests left unsent at the time limit,
and answers for the same image whose scores differ by more than 1e-6), and the server's
resident set size (psutil) after loading, before the load (after the warm-up) and after it. Exit status 1 when there were errors or the RSS grew by 50 MB or more.
Results: printed, and written to benchmarks/results/serve_load.json (serve_load_overlay.json
with --overlay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from prn.data.io import find_images

HOST = "127.0.0.1"
RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
MAX_GROWTH_MB = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, device: str | None, engine: str = "torch") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prn.cli", "serve", run, "--host", HOST, "--port", str(port), "--engine", engine]
    if device:
        cmd += ["--device", device]
    env = {k: v for k, v in os.environ.items() if k != "PRN_SERVE_TOKEN"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(server: subprocess.Popen, base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_clients(base: str, params: dict, payloads: list, clients: int, requests: int,
                deadline: float) -> dict:
    """``requests`` single-image POSTs from ``clients`` threads, each with its own connection."""
    next_index, lock = [0], threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    scores: dict[str, list[float]] = {}

    def client() -> None:
        with httpx.Client(timeout=max(1.0, deadline - time.monotonic())) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= requests:
                        return
                    next_index[0] += 1
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{base}/predict", params=params, files={"files": (name, data)})
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    scores.setdefault(name, []).append(r.json()["results"][0]["score"])  # names are unique paths

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "scores": scores, "sent": next_index[0],
            "wall": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run folder or checkpoint .pt")
    ap.add_argument("images", type=Path, help="folder of images to send (in turn)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds for the load phase")
    ap.add_argument("--warmup", type=int, default=150,
                    help="requests sent the same way first, not measured (default 150)")
    ap.add_argument("--overlay", action="store_true", help="ask for the heat-map overlay, as the page does")
    ap.add_argument("--device", help="the server's --device")
    ap.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="the server's --engine")
    args = ap.parse_args()

    files = find_images(args.images)
    if not files:
        raise SystemExit(f"{args.images}: no images")
    payloads = [(str(p.relative_to(args.images)), p.read_bytes()) for p in files]
    port = free_port()
    base = f"http://{HOST}:{port}"
    params = {"overlay": 1} if args.overlay else {}
    load_before = os.getloadavg()
    server = start_server(args.run, port, args.device, args.engine)
    try:
        wait_healthy(server, base, timeout=180)
        rss_loaded = rss_mb(server.pid)
        warm = run_clients(base, params, payloads, args.clients, args.warmup, time.monotonic() + 300)
        if warm["errors"]:
            raise SystemExit(f"warm-up failed: {warm['errors'][:3]}")
        rss_before = rss_mb(server.pid)
        load = run_clients(base, params, payloads, args.clients, args.requests,
                           time.monotonic() + args.time_limit)
        latencies, errors, scores, wall = load["latencies"], load["errors"], load["scores"], load["wall"]
        unsent = args.requests - load["sent"]
        if unsent:
            errors.append(f"{unsent} requests not sent within --time-limit {args.time_limit:g} s")
        for name, s in scores.items():
            if max(s) - min(s) > 1e-6:
                errors.append(f"{name}: scores differ between requests ({min(s)!r} .. {max(s)!r})")
        rss_after = rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()

    ms = np.asarray(latencies) * 1000
    result = {
        "run": str(args.run), "images": len(files), "overlay": args.overlay,
        "clients": args.clients, "warmup": args.warmup, "requests": args.requests,
        "completed": len(latencies),
        "seconds": round(wall, 2), "requests_per_second": round(len(latencies) / wall, 2),
        "latency_ms": {q: round(float(np.percentile(ms, p)), 1) if ms.size else None
                       for q, p in (("p50", 50), ("p95", 95), ("max", 100))},
        "errors": len(errors), "error_examples": errors[:5],
        "rss_mb": {"loaded": round(rss_loaded, 1), "before": round(rss_before, 1),
                   "after": round(rss_after, 1), "growth": round(rss_after - rss_before, 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    out = RESULTS.with_name(f"serve_load{'_overlay' if args.overlay else ''}"
                            f"{'' if args.engine == 'torch' else '_' + args.engine}_c{args.clients}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    lat = result["latency_ms"]
    print(f"\n| clients | requests | overlay | requests/s | p50 ms | p95 ms | errors | RSS before -> after (MB) |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {args.clients} | {len(latencies)}/{args.requests} | {'yes' if args.overlay else 'no'} | "
          f"{result['requests_per_second']} | {lat['p50']} | {lat['p95']} | {len(errors)} | "
          f"{result['rss_mb']['before']} -> {result['rss_mb']['after']} |")
    return int(bool(errors) or rss_after - rss_before >= MAX_GROWTH_MB)


if __name__ == "__main__":
    sys.exit(main())
