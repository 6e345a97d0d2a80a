"""The machine a run happens on: device, seeds, DataLoader workers (``cfg.runtime``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from prn import distributed
from prn.errors import TrainingError


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else the CPU; a named CUDA device that is absent raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for, but CUDA is not available here; use --device cpu")
    return device


def loader_workers(requested: int, device: torch.device) -> int:
    """DataLoader workers per process: ``requested`` when >= 0; for -1, sized from the device
    and this machine's CPUs shared by the local ranks. On CUDA the CPU only feeds the GPU, so
    all but one of the process's CPUs (at most 8) make anomalies; on the CPU the workers take
    cores from the forward pass, and 2 measured best on the 2-core machine (BENCHMARKS.md)."""
    if requested >= 0:
        return requested
    per_rank = max(1, distributed.usable_cpus() // distributed.world().local_size)
    if device.type == "cuda":
        return min(8, max(1, per_rank - 1))
    return min(2, per_rank)


_END = object()


def read_ahead(items: Iterable, depth: int = 1) -> Iterator:
    """The items of ``items`` in order, the next ``depth`` of them made in one thread meanwhile.
    Decoding and resizing (Pillow) release the GIL, so the next batch is read while the model
    runs on this one, without worker processes. Written here: a DataLoader reads ahead only in
    worker processes, and torch has no thread-based equivalent. An error raised making an item is
    raised here, at that item."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = deque(pool.submit(next, it, _END) for _ in range(max(1, depth)))
        while True:
            item = pending.popleft().result()
            if item is _END:
                return
            pending.append(pool.submit(next, it, _END))
            yield item


class ModelThread:
    """One long-lived thread that runs every torch computation of a server: loading the model,
    its forward passes, the maps resized back to the images.

    Why: PyTorch's CPU kernels run on OpenMP, and every thread that starts a parallel region keeps
    a team of OpenMP worker threads of its own. Once there are more such threads than cores (the
    main thread loaded the model, request threads run it), libgomp stops letting its workers spin
    between parallel regions, and every small operator of a forward pass waits for them to wake:
    the model ran 1.5-2x slower when called from a request thread than from the thread that loaded
    it (BENCHMARKS.md). Keeping torch in one thread keeps one team. Calls are serialised, so this
    is also the model's lock. Written here: no library offers a thread to pin torch work to."""

    def __init__(self, name: str = "prn-model", torch_threads: int | None = None):
        """``torch_threads``: torch's threads in the model thread alone (None: torch's default).
        1 where another engine runs the model (onnxruntime has its own threads, and torch's team
        spinning beside them, for the maps' resizes, slowed it down)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        if torch_threads is not None:
            # torch.set_num_threads sets the calling thread's OpenMP threads and also the default
            # that threads started later take when they first call torch: set it in the model
            # thread once torch has initialised there, then give the default back
            previous = torch.get_num_threads()
            self.run(lambda: (torch.get_num_threads(), torch.set_num_threads(torch_threads)))
            torch.set_num_threads(previous)

    def run(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the model thread, after the calls before it; its result, or
        its exception raised here."""
        return self.submit(fn, *args, **kwargs).result()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """``fn(*args, **kwargs)`` queued for the model thread, after the calls before it."""
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class JoinedCalls:
    """Calls of ``fn(jobs) -> results`` (a list in, one result per job out, in order) made from
    many threads and run in a ``ModelThread``, where the jobs that wait together go in one call:
    while the model runs one request's batch, the requests that arrive meanwhile queue, and the
    next pass takes them all (up to ``max_items`` items, the sizes the callers give; always at
    least one job). A lone caller waits for nothing: its job runs as soon as the thread is free.

    Why: a forward pass of one image took 35-44 ms on two cores where a batch of two to eight
    took 28-30 ms an image (BENCHMARKS.md), so a server's concurrent single-image requests go
    faster as one batch. Written here: torch and the web stack have no such queue (Triton's
    dynamic batching is a server of its own). An exception of ``fn`` is raised to every caller
    whose job was in that call."""

    def __init__(self, thread: ModelThread, fn, max_items: int):
        self.thread, self.fn, self.max_items = thread, fn, max(1, int(max_items))
        self._pending: deque = deque()
        self._lock = threading.Lock()

    def __call__(self, job, size: int = 1):
        """``fn([job, ...])``'s result for ``job``, from whichever call of the model thread took it."""
        done: Future = Future()
        with self._lock:
            self._pending.append((job, size, done))
        # one pass queued per job, so none is left behind; a pass finding the queue empty (an
        # earlier one took its job) returns at once
        self.thread.submit(self._pass)
        return done.result()

    def _pass(self) -> None:
        taken, items = [], 0
        with self._lock:
            while self._pending and (not taken or items + self._pending[0][1] <= self.max_items):
                job = self._pending.popleft()
                taken.append(job)
                items += job[1]
        if not taken:
            return
        try:
            results = list(self.fn([job for job, _, _ in taken]))
            if len(results) != len(taken):
                raise RuntimeError(f"{len(taken)} jobs went in and {len(results)} results came out")
        except BaseException as exc:  # every caller in this pass hears of it, and the thread goes on
            for _, _, done in taken:
                done.set_exception(exc)
            return
        for (_, _, done), result in zip(taken, results):
            done.set_result(result)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def timed(seconds: dict, key: str) -> Iterator[None]:
    """Add the block's wall seconds to ``seconds[key]``: the phases of a fit (``timings.json``'s
    ``fit_phases_seconds``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0


def release_memory() -> None:
    """Give the memory of freed objects back to the operating system between the phases of a
    fit (k-means, training, test). glibc keeps freed heap pages mapped, so the resident size of
    a phase stays in the next one and the peaks add up; ``malloc_trim`` returns them. No library
    wraps this call; elsewhere than glibc it does nothing. Under tcmalloc (prn.allocator) its
    own call does the same for its caches."""
    gc.collect()
    try:
        release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
    except (OSError, TypeError):  # no process-wide symbol table (Windows)
        release = None
    if release is not None:
        release()
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS, Windows: no malloc_trim
        return
    trim(0)
