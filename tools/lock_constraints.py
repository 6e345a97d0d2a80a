"""Write constraints.txt: the exact versions of every package ``pip install -e '.[dev]'`` pulls in
besides torch and torchvision, read from the environment this runs in.

Run it in a fresh virtual environment where the suite has just passed, so the file holds what
was tested (docs/testing.md, "Test dependencies"):

    python3 -m venv /tmp/lock && . /tmp/lock/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 && pip install -U -e '.[dev]'
    python -m pytest -m "not slow"                       # passes
    python tools/lock_constraints.py                     # rewrites constraints.txt

torch and torchvision are pinned by the install line itself (their CUDA or CPU build is the
machine's choice), so neither they nor the packages only they need (nvidia-*, triton, sympy, ...)
are listed. A package that prn needs and torch needs too (numpy, pillow, typing-extensions, ...)
is listed. Upper bounds for known breaks belong in pyproject.toml, with their reason; this file
only records what was tested.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "prn"
EXTRAS = ("dev",)
LEFT_TO_THE_INSTALL_LINE = {"torch", "torchvision"}  # pinned in README.md and .ci/run


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of everything project[extras] requires, transitively,
    without descending into LEFT_TO_THE_INSTALL_LINE."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(project, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonical(name), wanted) in seen:
            continue
        seen.add((canonical(name), wanted))
        dist = metadata.distribution(name)
        if canonical(name) != canonical(project):
            found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e})
                                                  for e in (wanted or {""})):
                continue
            if canonical(req.name) in LEFT_TO_THE_INSTALL_LINE:
                continue
            try:
                metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                sys.exit(f"{req.name} (required by {name}) is not installed: install "
                         f"'{project}[{','.join(extras)}]' first")
            todo.append((req.name, frozenset(req.extras)))
    return found


def render(pins: dict[str, str]) -> str:
    head = f"""\
# Exact versions of what `pip install -e '.[dev]'` pulls in besides torch and torchvision: the
# ones the suite last passed with. README.md's install line and .ci/run install with
# `-c constraints.txt`, so CI tests exactly these.
#
# Written by tools/lock_constraints.py on {date.today().isoformat()} (Python {platform.python_version()}, \
{platform.system()} {platform.machine()}),
# in a fresh venv after `python -m pytest -m "not slow"` passed there. To move to newer releases:
# bash tools/test_newest.sh, then regenerate as docs/testing.md says. Do not edit by hand, except
# to hold back one package that a new release broke (say why on the line above it).
"""
    return head + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; list where this environment differs from --out "
                             "(exit 1 when it does)")
    args = parser.parse_args(argv)
    pins = closure()
    if args.check:
        locked = {}
        for line in args.out.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                locked[canonical(req.name)] = str(req.specifier).removeprefix("==")
        diff = [f"{n}: {locked.get(n, '-')} locked, {pins.get(n, '-')} here"
                for n in sorted(set(locked) | set(pins)) if locked.get(n) != pins.get(n)]
        print("\n".join(diff) if diff else f"this environment matches {args.out.name}")
        return 1 if diff else 0
    args.out.write_text(render(pins))
    print(f"{args.out}: {len(pins)} packages pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
