"""prn.allocator: the command line re-executes itself once under tcmalloc where the machine has it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prn.allocator import find_tcmalloc, preload_environment
from prn.errors import UsageError

LIB = "libtcmalloc_minimal.so.4"


def found() -> str:
    """The loader's answer on a machine that has tcmalloc."""
    return LIB


def test_tcmalloc_is_preloaded_once_and_only_when_found_and_wanted():
    env = preload_environment({"PATH": "/bin"}, found)
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no report of large k-means arrays
    # a user's own preload is kept, after tcmalloc
    assert preload_environment({"LD_PRELOAD": "/opt/libx.so"}, found)["LD_PRELOAD"] == f"{LIB}:/opt/libx.so"
    # the re-executed process (or a user who preloads it already) runs on
    assert preload_environment({"LD_PRELOAD": f"/usr/lib/{LIB}"}, found) is None
    assert preload_environment({"LD_PRELOAD": "/opt/libx.so /usr/lib/libtcmalloc.so.4"}, found) is None
    # so is an allocator the user chose
    assert preload_environment({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, found) is None
    # a user's threshold for tcmalloc's reports wins
    assert preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, found)[
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    def not_asked():
        raise AssertionError("the loader was searched although PRN_ALLOCATOR=system")
    assert preload_environment({"PRN_ALLOCATOR": "system"}, not_asked) is None
    assert preload_environment({"PRN_ALLOCATOR": "auto"}, lambda: None) is None  # not installed: glibc's


def test_asking_for_tcmalloc_where_there_is_none_or_for_an_unknown_allocator_fails():
    with pytest.raises(UsageError, match="apt-get install libtcmalloc-minimal4"):
        preload_environment({"PRN_ALLOCATOR": "tcmalloc"}, lambda: None)
    with pytest.raises(UsageError, match="PRN_ALLOCATOR must be one of auto, tcmalloc, system, got 'jemalloc'"):
        preload_environment({"PRN_ALLOCATOR": "jemalloc"}, found)


def without_preload() -> dict[str, str]:
    """This environment less LD_PRELOAD: the child decides its allocator itself."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


REPORT = "from prn.allocator import reexec_with_tcmalloc, in_use; import os; reexec_with_tcmalloc(); print(in_use(), os.getpid())"


def _report(allocator: str) -> tuple[str, int]:
    env = without_preload()
    process = subprocess.Popen([sys.executable, "-c", REPORT], env={**env, "PRN_ALLOCATOR": allocator},
                               stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    name, pid = out.split()
    assert int(pid) == process.pid  # re-executed in place: torchrun and shells keep their process
    return name, int(pid)


def test_a_process_runs_on_tcmalloc_when_the_machine_has_it_and_on_glibc_when_told():
    assert _report("system")[0] == "system"
    assert _report("auto")[0] == ("tcmalloc" if find_tcmalloc() else "system")


def test_the_command_line_names_the_problem_when_the_allocator_asked_for_is_absent():
    env = without_preload()
    done = subprocess.run([sys.executable, "-m", "prn", "--version"], env={**env, "PRN_ALLOCATOR": "tcmalloc"},
                          capture_output=True, text=True, timeout=60)
    if find_tcmalloc():
        assert done.returncode == 0 and done.stdout.startswith("prn "), done.stderr
    else:
        assert done.returncode == 2 and "no tcmalloc library was found" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "prn", "--version"], env={**env, "PRN_ALLOCATOR": "mimalloc"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("prn: error: PRN_ALLOCATOR must be one of")
    # benchmarks/profile_fit.py chooses its allocator the same way and says so the same way
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_fit.py"
    bad = subprocess.run([sys.executable, str(script), "--root", "unused"], env={**env, "PRN_ALLOCATOR": "mimalloc"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("profile_fit.py: error: PRN_ALLOCATOR must be one of")


def test_a_fit_started_as_the_command_records_the_allocator_it_ran_on(demo_root, tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny_config(demo_root, tmp_path, epochs=1).save(config)
    env = without_preload()
    for allocator, expected in (("auto", "tcmalloc" if find_tcmalloc() else "system"), ("system", "system")):
        run = tmp_path / f"run_{allocator}"
        done = subprocess.run([sys.executable, "-m", "prn", "fit", "--config", str(config), "--run-dir", str(run),
                               "--quiet"], env={**env, "PRN_ALLOCATOR": allocator, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads((run / "environment.json").read_text())["allocator"] == expected, allocator
