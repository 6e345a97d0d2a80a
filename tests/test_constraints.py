"""The test environment's lock: constraints.txt pins every dependency pyproject.toml
names besides torch and torchvision, each pin inside pyproject's range (so an upper bound for a
known break and the lock agree), and README's install line and .ci/run both install with it and
the same torch pins as tools/test_newest.sh, which installs without it."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import load_script
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TORCH = {"torch", "torchvision"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line}"
        assert canonical(req.name) not in pins, f"pinned twice: {req.name}"
        pins[canonical(req.name)] = spec[0].version
    return pins


def _declared():
    """{requirement as written in pyproject.toml: Requirement}, prn's own extras left out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {r: Requirement(r) for r in reqs if canonical(Requirement(r).name) != "prn"}


def test_every_declared_dependency_but_torch_is_pinned_inside_its_range():
    pins = _locked()
    assert not TORCH & pins.keys()                     # the install line pins those
    for req in _declared().values():
        name = canonical(req.name)
        if name in TORCH:
            continue
        assert name in pins, f"{req.name} is not in constraints.txt (python tools/lock_constraints.py)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req}"


def test_upper_bounds_in_pyproject_each_give_their_reason():
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    bounded = [raw for raw, req in _declared().items()
               if any(s.operator in ("<", "<=", "~=") for s in req.specifier)]
    assert "trio<0.35" in bounded                      # the known one, while it lasts
    for raw in bounded:
        at = next(i for i, line in enumerate(lines) if f'"{raw}"' in line)
        comments = " ".join(line.split("#", 1)[1] for line in lines[max(0, at - 4):at + 1] if "#" in line)
        assert Requirement(raw).name in comments, f"{raw}: say why in a comment above it"


def _torch_pins(text):
    return sorted(re.findall(r"(torch(?:vision)?==[\w.+]+)", text))


def test_readme_and_ci_install_with_the_lock_and_the_same_torch_pins():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    newest = (ROOT / "tools" / "test_newest.sh").read_text()
    install = next(l for l in readme.splitlines() if l.startswith("pip install torch=="))
    assert "pip install -e '.[dev]' -c constraints.txt" in install
    assert "pip install --quiet -e '.[dev]' -c constraints.txt" in ci
    assert _torch_pins(install) == _torch_pins(ci) == _torch_pins(newest) != []
    commands = re.sub(r"#.*", "", newest)                # the newest releases, on purpose
    assert "pip install" in commands and not re.search(r"pip install[^\n]*constraints\.txt", commands)
    assert 'python -m pytest -m "not slow" -n auto' in readme and '-m "not slow" -n auto' in ci


def test_the_parallel_suite_keeps_the_tests_of_each_shared_export_in_one_worker(pytestconfig, monkeypatch):
    pytest.importorskip("xdist")
    import conftest
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])  # what -n 2 sets
    scope = conftest.pytest_xdist_make_scheduler(pytestconfig, None)._split_scope
    together = {scope(f"tests/{name}::test_x[a]") for name in conftest.SHARED_EXPORT_FILES}
    assert len(together) == 1
    assert scope("tests/test_cli.py::test_a") != scope("tests/test_cli.py::test_b") != together.pop()
    # every file that uses the shared export is in the group (else it would export it again)
    uses = re.compile(r'\btiled_run_onnx[,)"]')  # the fixture as a parameter or by name
    users = {p.name for p in (ROOT / "tests").glob("test_*.py") if uses.search(p.read_text())}
    assert users and users <= conftest.SHARED_EXPORT_FILES
    monkeypatch.setattr(pytestconfig.option, "dist", "loadfile")  # asked for by name: xdist's own
    assert conftest.pytest_xdist_make_scheduler(pytestconfig, None) is None


def test_the_lock_tool_lists_where_an_environment_differs(tmp_path):
    lock_constraints = load_script(ROOT / "tools" / "lock_constraints.py")
    here = lock_constraints.closure()
    if "pytest" not in here:
        pytest.skip("prn is not installed with its [dev] extra here")
    assert not TORCH & here.keys() and "pytest" in here and "fastapi" in here
    lock = tmp_path / "c.txt"
    assert lock_constraints.main(["--out", str(lock)]) == 0
    assert lock_constraints.main(["--out", str(lock), "--check"]) == 0
    lock.write_text(lock.read_text().replace(f"pytest=={here['pytest']}", "pytest==1.0"))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "lock_constraints.py"), "--out", str(lock),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 1 and f"pytest: 1.0 locked, {here['pytest']} here" in done.stdout
