"""Mutation testing of one prn module with mutmut (3.x), scoped to the tests that pin it.

    python tools/mutation.py prn/data/split.py tests/test_split.py tests/test_values_split.py

Copies prn/, tests/ and pyproject.toml to ``.mutmut/<module>/`` (git-ignored), writes a
``[tool.mutmut]`` table that mutates only MODULE and runs only the TEST files, runs
``mutmut run`` there, then prints killed/survived/total, the wall time and the surviving
mutants. ``cd .mutmut/<module> && mutmut show NAME`` prints a mutant's diff. Not part of CI;
see docs/testing.md. Run it niced (``OMP_NUM_THREADS=1 nice -n 19``) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mutmut_table(module: str, tests: list[str]) -> str:
    def toml_list(items):
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"
    return "\n".join([
        "[tool.mutmut]",
        'source_paths = ["prn"]',
        f"only_mutate = {toml_list([module])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow", "-x", "-q"]',
        "use_git_change_detection = false",
        "",
    ])


def prepare(work: Path, module: str, tests: list[str], fresh: bool) -> None:
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs")
    for name in ("prn", "tests"):
        if (work / name).exists():
            shutil.rmtree(work / name)
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\[).*\n?)*", "\n", text)  # drop any existing table
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n" + mutmut_table(module, tests))


def counts(work: Path, env: dict) -> dict:
    subprocess.run(["mutmut", "export-cicd-stats"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module", help="file to mutate, e.g. prn/data/split.py")
    p.add_argument("tests", nargs="+", help="test files that form the runner")
    p.add_argument("--max-children", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="reuse earlier results in the work folder")
    p.add_argument("--work", help="work folder (default .mutmut/<module>)")
    args = p.parse_args(argv)

    slug = args.module.removesuffix(".py").replace("/", ".")
    work = Path(args.work) if args.work else ROOT / ".mutmut" / slug
    prepare(work, args.module, args.tests, fresh=not args.keep)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    run = subprocess.run(["mutmut", "run", "--max-children", str(args.max_children)], cwd=work, env=env)
    seconds = time.perf_counter() - t0
    stats = counts(work, env)
    survivors = subprocess.run(["mutmut", "results"], cwd=work, env=env, text=True,
                               capture_output=True).stdout
    summary = {"module": args.module, "tests": args.tests, "seconds": round(seconds),
               "killed": stats["killed"], "survived": stats["survived"], "total": stats["total"],
               **{k: stats[k] for k in ("no_tests", "timeout", "suspicious", "skipped", "segfault")}}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(survivors)
    print(json.dumps(summary))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
