"""The memory allocator a ``prn`` command runs under: tcmalloc where the machine has it.

glibc's malloc keeps the freed blocks of a training step's many tensor sizes in a fragmented heap,
so a float32 `cpu` fit peaks about 350 MB above what it holds (BENCHMARKS.md, "Where a float32
fit's memory peaks"). tcmalloc reuses them by size class: float32 fits of both development sets
peaked at 1.80-1.92 GiB instead of 2.23-2.30 GiB, trained faster and gave the same figures
(BENCHMARKS.md, "tcmalloc"). An allocator can only be chosen when a
process starts (``LD_PRELOAD``), so the command line re-executes itself once, before torch is
imported, with the library preloaded, as PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu
--enable-tcmalloc``) does. Nothing here imports torch.

``prn export`` is left on the system's allocator (prn.cli.entry): OpenVINO, which ``--format
openvino`` runs, aborts in a process preloaded with tcmalloc (BENCHMARKS.md, "OpenVINO on the
exported graph").

``PRN_ALLOCATOR``: ``auto`` (default: tcmalloc if found, else the system's), ``tcmalloc`` (fail
if not found) or ``system`` (never re-execute). An allocator the user preloads already (jemalloc,
mimalloc, tcmalloc in ``LD_PRELOAD``) is kept. Debian and Ubuntu ship the library as
``libtcmalloc-minimal4``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from prn.errors import UsageError

CHOICES = ("auto", "tcmalloc", "system")
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # the minimal build first: no heap profiler
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # preloaded by a user, they are kept
# tcmalloc reports every allocation over 1 GiB on stderr; a fit's large k-means arrays are normal.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """The tcmalloc library's name as the dynamic loader finds it, or None (not Linux, not installed)."""
    if not sys.platform.startswith("linux"):
        return None
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_environment(environ: Mapping[str, str],
                        find: Callable[[], str | None] = find_tcmalloc) -> dict[str, str] | None:
    """The environment to re-execute under, or None to run on as is: ``PRN_ALLOCATOR`` is
    ``system``, ``find`` found no library under ``auto``, or an allocator is preloaded already (the
    re-executed process, or the user's own choice in ``LD_PRELOAD``). ``find`` is called only when
    the choice needs it (a miss costs the loader's search, ~20 ms a name)."""
    choice = environ.get("PRN_ALLOCATOR", "auto")
    if choice not in CHOICES:
        raise UsageError(f"PRN_ALLOCATOR must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system":
        return None
    library = find()
    if library is None:
        if choice == "tcmalloc":
            raise UsageError("PRN_ALLOCATOR=tcmalloc, but no tcmalloc library was found "
                             "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4); "
                             "PRN_ALLOCATOR=auto runs on the system's allocator instead")
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if any(allocator_of(p) for p in preloaded.replace(":", " ").split()):
        return None
    env = {**QUIET, **environ}
    env["LD_PRELOAD"] = f"{library}:{preloaded}" if preloaded else library
    return env


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc, when ``preload_environment``
    asks for it; returns only when it does not. Called by the command line before it imports
    torch; the process keeps its id, so torchrun and shells see the same process."""
    env = preload_environment(os.environ)
    if env is None or "torch" in sys.modules:  # too late to change the allocator of this process
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def reexec_for_command(prog: str) -> None:
    """``reexec_with_tcmalloc`` for a command line (``prn``, the benchmark scripts): a bad
    ``PRN_ALLOCATOR`` (misspelt, or tcmalloc asked for and absent) ends the process with one line,
    ``PROG: error: ...``, and the usage exit status instead of a traceback."""
    try:
        reexec_with_tcmalloc()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_status))


def allocator_of(path: str) -> str | None:
    """The allocator a shared library is ("tcmalloc", "jemalloc", "mimalloc"), or None."""
    name = Path(path).name
    return next((a for a in ALLOCATORS if name.startswith(f"lib{a}")), None)


def in_use() -> str:
    """The preloaded allocator this process runs on, else "system" (recorded in environment.json)."""
    try:
        maps = Path("/proc/self/maps").read_text().split()
    except OSError:
        return "system"
    return next((a for a in map(allocator_of, maps) if a), "system")
