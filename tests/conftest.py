"""Shared fixtures: a tiny synthetic dataset and a config small enough for CPU tests."""

import importlib.util
import os
from pathlib import Path

import pytest

from prn.config import PRNConfig
from prn.data.demo import make_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, seed=0, n_train=12, n_test_good=4, n_test_defect=6, size=64)
    return root


def load_script(path, monkeypatch=None):
    """A script that is not a module of the package (benchmarks/, tools/), imported from its file.
    With ``monkeypatch`` its folder goes first on sys.path for the test, as when it runs as a
    script: it may import the scripts beside it."""
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_config(root, out, **kw):
    base = dict(dataset="demo", root=str(root), category="demo", image_size=64, seen_anomalies=2,
                backbone="tf_efficientnet_lite0", backbone_weights="random", epochs=3, batch_size=8,
                steps_per_epoch=2, eval_batch_size=8, attention_dim=8, decoder_channels=(16, 16, 8, 8),
                prototype_ratio=0.25, kmeans_max_iter=20, output_dir=str(out), top_k=10, device="cpu",
                num_workers=0)
    base.update(kw)
    return PRNConfig(**base)


@pytest.fixture
def tiny_config():
    """tiny_config(root, out, **changes) -> PRNConfig for a seconds-long run."""
    return make_tiny_config


@pytest.fixture(scope="session")
def calibrated_run(demo_root, tmp_path_factory):
    """A tiny PRN run trained one step, calibrated on 4 held-out good images and tested
    (results.json), shared by the tests that serve or deploy a model."""
    from prn import api
    out = tmp_path_factory.mktemp("calibrated_run")
    cfg = make_tiny_config(demo_root, out, epochs=1, steps_per_epoch=1, val_normal_min=4)
    run = api.fit(cfg, run_dir=out / "run", progress=False)
    api.test(run, progress=False, overlays=0)
    return run


@pytest.fixture(scope="session")
def tiled_run(demo_root, tmp_path_factory):
    """A tiny PRN run with 2 x 2 tiles of 64 x 64 (images resized to 128 x 128), trained two steps
    and calibrated on 4 held-out good images, shared by the tiling, engine and pipeline tests."""
    from prn import api
    out = tmp_path_factory.mktemp("tiled_run")
    cfg = make_tiny_config(demo_root, out, image_size=128, tiles=2, epochs=1, steps_per_epoch=2, val_normal_min=4)
    return api.fit(cfg, run_dir=out / "run", progress=False)


@pytest.fixture(scope="session")
def tiled_run_onnx(tiled_run, tmp_path_factory):
    """tiled_run exported to ONNX once, for the tests that hold the graph against prn: torch's
    exporter takes about a minute here (most of it tracing with a symbolic batch size, whatever
    the model's size), so the suite makes as few exports as it can; copy it, never change it."""
    pytest.importorskip("onnxruntime")
    from prn.deploy.export import export
    return export(tiled_run, "onnx", tmp_path_factory.mktemp("tiled_onnx") / "model.onnx")


# Running the suite in parallel (README: `python -m pytest -m "not slow" -n auto`, pytest-xdist).
# The files whose tests share an ONNX export (about a minute each here: the shared tiled run's,
# tiled_run_onnx, and test_export.py's) run in one worker, so that each export is made once.
# xdist's own `--dist loadgroup` would do this from marks, but under pytest 9.2 it silently stops
# grouping (pytest-xdist issue 1386), so the grouping is by file, in the scheduler below; every
# other test is sent on its own, as `--dist load` does.
SHARED_EXPORT_FILES = {"test_engine.py", "test_export.py", "test_pipeline.py", "test_tiling.py"}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":
        return None  # another --dist asked for by name: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class SharedExportScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return "shared-onnx-exports" if Path(nodeid.split("::")[0]).name in SHARED_EXPORT_FILES else nodeid

    return SharedExportScheduling(config, log)


def _split_threads_among_workers():
    """Each of N workers on C cores computes with C // N threads (at least one): N processes of C
    threads each would contend for the same cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        from prn.distributed import usable_cpus
        torch.set_num_threads(max(1, usable_cpus() // workers))


_split_threads_among_workers()
