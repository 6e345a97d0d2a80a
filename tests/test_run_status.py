"""A run's status.json and what loading a run without a checkpoint says: the `latest`
link moves to a run when its folder is made, so it can point at a run that failed before its
first checkpoint; `prn test runs/.../latest` then says what became of that run (failed with its
error, interrupted, still running, its process gone) and names the newest run with a checkpoint.

A failing fit is made to fail right after its run folder is made (where a data, memory or
interrupt error before the first checkpoint would stop it), so it takes a fraction of a second.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from prn import api, runs
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.errors import CheckpointError, DataError, ExitStatus


@pytest.fixture
def fit_with(monkeypatch, demo_root, tiny_config, tmp_path):
    """fit_with(effect): api.fit, with effect(run_dir) run as soon as the run folder is made."""
    real = api.start_run

    def start_then(effect):
        def start_run(*args, **kwargs):
            run_dir, split, cfg = real(*args, **kwargs)
            effect(run_dir)
            return run_dir, split, cfg
        return start_run

    def fit(effect):
        monkeypatch.setattr(api, "start_run", start_then(effect))
        return api.fit(tiny_config(demo_root, tmp_path / "runs"), progress=False)
    return fit


def _checkpoint(run_dir):
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"weights")


def _fail(error):
    def effect(run_dir):
        raise error
    return effect


def _latest(tmp_path):
    return tmp_path / "runs" / "demo" / "demo" / "latest"


def _earlier_run_with_checkpoint(parent, name="20200101-000000"):
    run = parent / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("dataset: demo\n")
    os.utime(run / "config.yaml", (1e9, 1e9))
    _checkpoint(run)
    return run


def test_a_finished_fit_is_marked_finished_with_its_process_and_times(calibrated_run):
    status = runs.read_status(calibrated_run)           # the session's real (tiny) fit
    assert status["state"] == "finished" and status["pid"] == os.getpid()
    assert status["host"] == socket.gethostname() and status["started"] <= status["ended"]
    assert "error" not in status


def _phases(run):
    timings = json.loads((run / "timings.json").read_text())
    phases = timings["fit_phases_seconds"]
    assert all(v >= 0 for v in phases.values())
    # the fit's phases lie inside its wall time; the calibration comes after it
    assert sum(v for k, v in phases.items() if k != "calibration") <= timings["fit_seconds"]
    return phases


def test_timings_say_where_the_fit_went(calibrated_run):
    phases = _phases(calibrated_run)
    assert set(phases) == {"load images", "prototypes", "training", "validation", "defect memory", "calibration"}
    assert min(phases[k] for k in ("load images", "prototypes", "training", "validation")) > 0


@pytest.mark.parametrize("kind, fitted", [("patchcore", "memory bank"), ("prototypes", "prototypes")])
def test_timings_of_a_model_that_trains_nothing(kind, fitted, demo_root, tiny_config, tmp_path):
    run = api.fit(tiny_config(demo_root, tmp_path, val_normal_min=4), run_dir=tmp_path / kind, progress=False,
                  model=kind)
    phases = _phases(run)
    assert set(phases) == {"load images", fitted, "validation", "calibration"}
    assert phases[fitted] > 0 and phases["validation"] > 0


def test_prn_test_on_a_latest_that_failed_says_why_and_names_the_last_good_run(fit_with, tmp_path, capsys):
    good = _earlier_run_with_checkpoint(_latest(tmp_path).parent)
    with pytest.raises(DataError, match="bad.png"):
        fit_with(_fail(DataError("images/bad.png: cannot decode image, the file is truncated")))
    latest = _latest(tmp_path)
    failed = latest.resolve()
    assert failed != good.resolve()                      # latest points at the failed run
    status = runs.read_status(failed)
    assert status["state"] == "failed"
    assert status["error"] == "DataError: images/bad.png: cannot decode image, the file is truncated"

    assert main(["test", str(latest), "--quiet"]) == ExitStatus.MODEL
    err = capsys.readouterr().err
    assert f"the run {failed.name} (that latest points at) failed before its first checkpoint" in err
    assert "(DataError: images/bad.png: cannot decode image" in err
    assert f"the newest run there with a checkpoint is {latest.parent / good.name}" in err
    with pytest.raises(CheckpointError, match="failed before its first checkpoint"):
        api.test(latest, progress=False)


def test_an_interrupted_fit_is_marked_interrupted(fit_with, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit_with(_fail(KeyboardInterrupt()))
    assert runs.read_status(_latest(tmp_path))["state"] == "interrupted"
    with pytest.raises(CheckpointError, match="was interrupted before its first checkpoint") as e:
        load_checkpoint(_latest(tmp_path))
    assert "newest run there" not in str(e.value)        # there is none


def test_a_status_file_that_cannot_be_written_never_hides_the_runs_own_error(fit_with, monkeypatch):
    def effect(run_dir):
        def broken(*args, **kwargs):
            raise OSError("disk full")
        monkeypatch.setattr(runs, "_write_status", broken)
        raise DataError("the real problem")
    with pytest.raises(DataError, match="the real problem"):
        fit_with(effect)


def _started_run(tmp_path, **status):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("dataset: demo\n")
    runs.mark_started(run)
    data = runs.read_status(run)
    data.update(status)
    (run / "status.json").write_text(json.dumps(data))
    return run


def test_a_run_still_training_its_first_epoch_says_so(tmp_path):
    run = _started_run(tmp_path)                        # this process: alive
    with pytest.raises(CheckpointError, match=rf"is still running \(process {os.getpid()}\) and has no checkpoint yet"):
        load_checkpoint(run)


def test_a_run_whose_process_is_gone_says_it_ended_without_a_checkpoint(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = _started_run(tmp_path, pid=int(gone.stdout))
    with pytest.raises(CheckpointError, match=rf"its process \({int(gone.stdout)}\) ended without writing one"):
        load_checkpoint(run)


def test_a_run_started_on_another_host_names_the_host(tmp_path):
    run = _started_run(tmp_path, host="line-pc-7")
    with pytest.raises(CheckpointError, match="was started on line-pc-7 at .* and has no checkpoint yet"):
        load_checkpoint(run)


def test_runs_of_older_versions_and_folders_that_are_no_run_keep_the_plain_message(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("dataset: demo\n")  # a run without status.json
    with pytest.raises(CheckpointError, match="has no checkpoint \\(and no status.json"):
        load_checkpoint(old)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nothing")
    assert str(e.value).endswith("checkpoint not found")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(plain)
    assert str(e.value).endswith("checkpoints/last.pt: checkpoint not found")


def test_the_newest_run_with_a_checkpoint_is_the_last_started(tmp_path):
    parent = tmp_path / "runs"
    for name, mtime in (("b", 100), ("a", 200), ("c", 300)):
        (parent / name).mkdir(parents=True)
        (parent / name / "config.yaml").write_text("x")
        os.utime(parent / name / "config.yaml", (mtime, mtime))
        if name != "c":
            _checkpoint(parent / name)
    assert runs.newest_run_with_checkpoint(parent) == parent / "a"
    assert runs.newest_run_with_checkpoint(parent, exclude=parent / "a") == parent / "b"
