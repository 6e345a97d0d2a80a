"""The ``prn`` command's exit: every exit handler runs, then the process ends without Python's
teardown of its modules (prn.cli._skip_teardown); the status, stdout and other threads' work are kept."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# A command whose main() does what real commands do before they return: an exit handler of its
# own (logging's, a temporary folder's), a thread still working, a long answer on stdout; and an
# object whose destructor only module teardown would run.
SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    import prn.cli as cli
    out = Path(sys.argv[1])

    class Torn:
        def __del__(self):
            (out / "teardown").write_text("ran")

    def main():
        global kept
        kept = Torn()
        atexit.register(lambda: (out / "handler").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("ran")
        threading.Thread(target=late).start()
        if sys.argv[2] == "raise":
            raise RuntimeError("boom")
        sys.stdout.write("x" * 300_000 + "\\nend\\n")
        return int(sys.argv[2])

    cli.main = main
    cli.entry()
""")


def run(tmp_path: Path, arg: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PRN_FULL_EXIT"}
    environ.update(PRN_ALLOCATOR="system", **env)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), arg], capture_output=True,
                          text=True, env=environ, timeout=120)


def test_the_command_exits_after_its_handlers_without_the_teardown(tmp_path):
    done = run(tmp_path, "3")
    assert done.returncode == 3, done.stderr
    assert done.stdout.endswith("x\nend\n") and len(done.stdout) == 300_005  # flushed into the pipe
    assert (tmp_path / "handler").exists() and (tmp_path / "thread").exists()
    assert not (tmp_path / "teardown").exists()


def test_full_exit_keeps_the_teardown_and_a_failure_gets_it_too(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    done = run(full, "0", PRN_FULL_EXIT="1")
    assert done.returncode == 0 and done.stdout.endswith("end\n")
    assert {p.name for p in full.iterdir()} == {"handler", "thread", "teardown"}
    # an uncaught exception is Python's to report, with its usual exit
    failed = tmp_path / "failed"
    failed.mkdir()
    done = run(failed, "raise")
    assert done.returncode == 1 and "RuntimeError: boom" in done.stderr
    assert {p.name for p in failed.iterdir()} == {"handler", "thread", "teardown"}
