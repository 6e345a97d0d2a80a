"""What a new user tripped over: typed --set, one meaning per flag, settings
precedence, --resume and --run-dir that refuse what they would ignore or destroy, exit statuses,
the `latest` link and the run-folder layout, README's install and test commands."""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from prn import api, runs
from prn.cli import EXIT_STATUSES, build_parser, config_from_args, main
from prn.config import PRNConfig
from prn.presets import PRESETS
from prn.settings import parse_field
from prn.errors import ExitStatus, PRNError, TrainingError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_work(monkeypatch):
    """Replace fit, resume, test, predict and the data split with recorders; any call is logged."""
    calls = []

    def recorder(name, result=None):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result
        return record

    monkeypatch.setattr(api, "fit", recorder("fit", lambda cfg, run_dir=None, **kw: run_dir or Path("run")))
    monkeypatch.setattr(api, "resume", recorder("resume", lambda run, **kw: run))
    monkeypatch.setattr(api, "test", recorder("test", {}))
    monkeypatch.setattr(runs, "make_split", recorder("make_split"))
    return calls


def fit_config(*argv):
    return config_from_args(build_parser().parse_args(["fit", *argv]))


# ----------------------------------------------------------------------------- --set

def test_set_values_take_the_type_of_their_field(tmp_path):
    cfg = fit_config("--root", str(tmp_path), "--set", "lr=1e-4", "--set", "category=01",
                     "--set", "image_hw=384,160", "--set", "use_attention=no",
                     "--set", "target_size=[0.2, 0.5]", "--set", "weight_decay=0")
    assert isinstance(cfg.training.lr, float) and cfg.training.lr == 1e-4
    assert cfg.data.category == "01"
    assert cfg.model.image_hw == (384, 160) and cfg.model.use_attention is False
    assert cfg.synthesis.target_size == (0.2, 0.5)
    assert isinstance(cfg.training.weight_decay, float) and cfg.training.weight_decay == 0.0


@pytest.mark.parametrize("item, expected", [
    ("epochs=abc", "an integer"), ("epochs=1.5", "an integer"), ("lr=fast", "a finite number"),
    ("lr=nan", "a finite number"), ("use_attention=maybe", "true or false"),
    ("image_hw=384", "2 integers"), ("attention_patch_divisors=1,x", "a list of integers"),
])
def test_a_set_value_that_does_not_convert_is_refused_before_any_work(tmp_path, capsys, no_work, item, expected):
    assert main(["fit", "--root", str(tmp_path), "--set", item]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    key, value = item.split("=")
    assert f"{key} takes {expected}" in err and repr(value) in err and "Traceback" not in err
    assert no_work == []  # neither the split (data loading) nor k-means nor training started


def test_an_unknown_set_key_suggests_the_field_meant(tmp_path, capsys, no_work):
    assert main(["fit", "--root", str(tmp_path), "--set", "learning_rat=1"]) == ExitStatus.USAGE
    assert "learning_rat" in capsys.readouterr().err and no_work == []
    assert main(["fit", "--root", str(tmp_path), "--set", "epochz=3"]) == ExitStatus.USAGE
    assert "did you mean epochs?" in capsys.readouterr().err


def test_parse_field_keeps_text_fields_as_written():
    assert parse_field("category", "01") == "01" and parse_field("mask_suffix", " _m") == " _m"
    assert parse_field("seen_anomalies", " 5 ") == 5 and parse_field("keep_aspect", "ON") is True


def test_a_config_file_is_typed_like_set(tmp_path, capsys, no_work):
    config = tmp_path / "cfg.yaml"
    # YAML 1.1 alone would read 01 as the number 1 and 1e-4 as the text '1e-4'
    config.write_text("root: data\nlr: 1e-4\ncategory: 01\nimage_hw: [384, 160]\nuse_attention: no\n")
    cfg = fit_config("--config", str(config))
    assert cfg.training.lr == 1e-4 and isinstance(cfg.training.lr, float) and cfg.data.category == "01"
    assert cfg.model.image_hw == (384, 160) and cfg.model.use_attention is False
    a_run_config = tmp_path / "run.yaml"
    PRNConfig(root="data", category="01", lr=3e-4).save(a_run_config)  # what every run writes
    assert fit_config("--config", str(a_run_config)) == PRNConfig(root="data", category="01", lr=3e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: data\nepochs: many\n")
    assert main(["fit", "--config", str(bad)]) == ExitStatus.DATA
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "epochs takes an integer, got 'many'" in err and no_work == []


# ----------------------------------------------------------------------------- precedence

def test_preset_overrides_config_file_flags_override_preset_and_set_comes_last(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"root": "data", "dataset": "btad", "epochs": 50, "lr": 0.5}))
    cfg = fit_config("--config", str(config), "--preset", "cpu")
    assert cfg.data.dataset == "btad"  # the file's, the preset does not set it
    assert (cfg.training.epochs, cfg.training.lr) == (PRESETS["cpu"]["epochs"], PRESETS["cpu"]["lr"])  # the preset's
    note = capsys.readouterr().err
    assert "--preset cpu replaces" in note and "epochs 50 -> 10" in note and "lr 0.5 -> 0.001" in note
    assert fit_config("--config", str(config), "--preset", "cpu", "--epochs", "3").training.epochs == 3
    assert fit_config("--config", str(config), "--preset", "cpu", "--epochs", "3",
                      "--set", "epochs=4", "--set", "training.epochs=5").training.epochs == 5


def test_the_precision_flag_keeps_float32_under_the_fast_preset():
    assert fit_config("--preset", "cpu-fast").training.precision == "auto"
    cfg = fit_config("--preset", "cpu-fast", "--precision", "32")
    assert (cfg.training.precision, cfg.model.use_attention) == ("32", False)


def test_a_preset_alone_or_a_file_alone_prints_no_note(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"root": "data", "epochs": 10}))  # what the cpu preset sets too
    fit_config("--config", str(config), "--preset", "cpu")
    fit_config("--root", "data", "--preset", "cpu")
    assert "note" not in capsys.readouterr().err


def test_the_help_says_the_precedence(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "later ones winning" in out and "then --config FILE, then --preset" in out
    assert "then each --set in order" in out


# ----------------------------------------------------------------------------- --resume, --run-dir

def make_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    PRNConfig(root="data").save(folder / "config.yaml")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("extra, named", [
    (["--preset", "cpu"], "--preset"), (["--set", "lr=1e-3"], "--set lr=1e-3"),
    (["--batch-size", "8"], "--batch-size"), (["--config", "c.yaml"], "--config"),
    (["--run-dir", "elsewhere"], "--run-dir"), (["--model", "patchcore"], "--model"),
    (["--device", "cpu"], "--device"),
])
def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys, no_work, extra, named):
    run = make_run(tmp_path / "run")
    assert main(["fit", "--resume", str(run), *extra]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert named in err and "--epochs" in err and no_work == []


def test_resume_takes_epochs_test_and_quiet(tmp_path, no_work):
    run = make_run(tmp_path / "run")
    assert main(["fit", "--resume", str(run), "--epochs", "12", "--test", "--quiet"]) == ExitStatus.OK
    assert [(name, kw.get("epochs")) for name, _, kw in no_work] == [("resume", 12), ("test", None)]


def test_resume_of_a_folder_that_is_no_run_is_a_model_error(tmp_path, capsys, no_work):
    assert main(["fit", "--resume", str(tmp_path)]) == ExitStatus.MODEL
    assert "no config.yaml" in capsys.readouterr().err and no_work == []


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import prn.deploy.loading
    import prn.deploy.predict
    file = tmp_path / "results"
    file.write_text("not a folder")
    # nothing is loaded or fitted: the check comes first
    monkeypatch.setattr(prn.deploy.predict, "Predictor", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(api, "load_model_full", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(runs, "make_split", lambda *a, **k: pytest.fail("the data was read"))
    for argv, named in (
            (["predict", str(tmp_path), str(tmp_path), "--out", str(file)], f"{file}: --out is a file"),
            (["predict", str(tmp_path), str(tmp_path), "--out", str(file / "a" / "b")],
             f"--out is inside {file}, which is a file"),
            (["test", str(tmp_path), "--out", str(file)], f"{file}: --out is a file"),
            (["show-anomalies", "--out", str(file)], f"{file}: --out is a file"),
            (["demo", "--out", str(file / "x")], f"--out is inside {file}, which is a file"),
            (["fit", "--root", str(tmp_path), "--set", f"output_dir={file}"], f"{file}: output_dir is a file")):
        assert main(argv) == ExitStatus.USAGE, argv
        err = capsys.readouterr().err
        assert named in err and "give a folder for the results" in err, (argv, err)
    assert file.read_text() == "not a folder"


def test_run_dir_holding_a_run_is_refused_and_kept(tmp_path, capsys, no_work):
    run = make_run(tmp_path / "run")
    assert main(["fit", "--root", str(tmp_path), "--run-dir", str(run)]) == ExitStatus.USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"weights" and no_work == []


def test_overwrite_replaces_the_run_in_run_dir(tmp_path, no_work):
    run = make_run(tmp_path / "run")
    (run / "results.json").write_text("{}")
    assert main(["fit", "--root", str(tmp_path), "--run-dir", str(run), "--overwrite", "--quiet"]) == 0
    assert [c[0] for c in no_work] == ["fit"] and no_work[0][2]["run_dir"] == run
    assert run.is_dir() and list(run.iterdir()) == []  # the earlier run's files are gone


def test_a_non_empty_folder_that_is_no_run_is_never_deleted(tmp_path, capsys, no_work):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    assert main(["fit", "--root", str(tmp_path), "--run-dir", str(folder), "--overwrite"]) == ExitStatus.USAGE
    assert "not a prn run" in capsys.readouterr().err
    assert (folder / "holiday.jpg").read_bytes() == b"jpeg" and no_work == []


def test_an_empty_or_new_run_dir_is_accepted_and_overwrite_needs_run_dir(tmp_path, capsys, no_work):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new"):
        assert main(["fit", "--root", str(tmp_path), "--run-dir", str(folder), "--quiet"]) == 0
    assert main(["fit", "--root", str(tmp_path), "--overwrite"]) == ExitStatus.USAGE
    assert "--overwrite goes with --run-dir" in capsys.readouterr().err
    assert [c[0] for c in no_work] == ["fit", "fit"]


# ----------------------------------------------------------------------------- --overlays

@pytest.mark.parametrize("verb", ["test", "predict"])
def test_overlays_is_a_count_in_test_and_predict(verb, tmp_path):
    argv = [verb, "run"] + (["images"] if verb == "predict" else [])
    parser = build_parser()
    assert parser.parse_args(argv + ["--overlays", "3"]).overlays == 3
    assert parser.parse_args(argv + ["--overlays", "-1"]).overlays == -1  # all
    assert parser.parse_args(argv).overlays == {"test": 8, "predict": 0}[verb]
    for bad in ("-2", "x"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv + ["--overlays", bad])
        assert info.value.code == ExitStatus.USAGE


def test_test_overlays_all_asks_for_every_test_image(tmp_path, no_work):
    assert main(["test", str(tmp_path), "--overlays", "-1", "--quiet"]) == 0
    assert main(["test", str(tmp_path), "--overlays", "2", "--quiet"]) == 0
    counts = [kw["overlays"] for _, _, kw in no_work]
    assert counts[0] >= 10**9 and counts[1] == 2


# ----------------------------------------------------------------------------- exit statuses

def test_the_exit_status_table_is_the_documented_one():
    assert {s.name: int(s) for s in ExitStatus} == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "DEFECT": 3, "DATA": 4, "MODEL": 5, "TRAINING": 6,
        "INTERRUPTED": 130}
    help_codes = [int(m) for m in re.findall(r"^  (\d+) ", EXIT_STATUSES, re.M)]
    assert help_codes == [int(s) for s in ExitStatus]
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Exit statuses"):]
    assert [int(m) for m in re.findall(r"^\| `?(\d+)`? \|", table, re.M)] == [int(s) for s in ExitStatus]


def test_prn_help_ends_with_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit statuses:" in out and "--fail-on-defect" in out and "130" in out


def test_a_malformed_command_line_exits_2():
    for argv in (["fit", "--epochs", "many"], ["fit", "--no-such-flag"], ["nonsense"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == ExitStatus.USAGE


def test_bad_data_and_bad_model_files_have_their_own_statuses(tmp_path, capsys):
    assert main(["fit", "--dataset", "mvtec", "--root", str(tmp_path / "absent"), "--category", "x",
                 "--quiet"]) == ExitStatus.DATA
    assert main(["test", str(tmp_path / "no_run"), "--quiet"]) == ExitStatus.MODEL
    assert main(["fit", "--config", str(tmp_path / "absent.yaml")]) == ExitStatus.DATA
    err = capsys.readouterr().err
    assert "absent" in err and "no_run" in err and "absent.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize("raised, status", [
    (TrainingError("loss is nan"), ExitStatus.TRAINING), (KeyboardInterrupt(), ExitStatus.INTERRUPTED),
    (PermissionError("runs: permission denied"), ExitStatus.DATA), (PRNError("other"), ExitStatus.ERROR),
])
def test_errors_during_fit_map_to_their_status(tmp_path, monkeypatch, raised, status):
    def fail(*args, **kwargs):
        raise raised
    monkeypatch.setattr(api, "fit", fail)
    assert main(["fit", "--root", str(tmp_path), "--quiet"]) == status


@pytest.mark.parametrize("defective, status", [(0, ExitStatus.OK), (2, ExitStatus.DEFECT)])
def test_fail_on_defect_exits_3_only_when_an_image_is_judged_defective(tmp_path, monkeypatch, defective, status):
    summary = SimpleNamespace(n_images=5, seconds=1.0, images_per_second=5.0, n_defective=defective,
                              n_errors=0, csv=tmp_path / "scores.csv", decided=True)
    monkeypatch.setattr(api, "predict", lambda *a, **kw: summary)
    assert main(["predict", "run", str(tmp_path), "--fail-on-defect", "--quiet"]) == status
    assert main(["predict", "run", str(tmp_path), "--quiet"]) == ExitStatus.OK


# ----------------------------------------------------------------------------- run folders

def test_new_run_folders_get_a_latest_link_to_the_newest(tmp_path):
    cfg = PRNConfig(dataset="mvtec", category="bottle", output_dir=str(tmp_path))
    first = runs.new_run_dir(cfg, name="a")
    second = runs.new_run_dir(cfg, name="a")  # taken: a-1
    assert first == tmp_path / "mvtec" / "bottle" / "a" and second.name == "a-1"
    latest = tmp_path / "mvtec" / "bottle" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "a-1"  # relative: the tree can move
    assert latest.resolve() == second.resolve()


def test_where_links_fail_a_latest_file_names_the_newest(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not supported here")
    monkeypatch.setattr(os, "symlink", no_links)
    run = runs.new_run_dir(PRNConfig(output_dir=str(tmp_path), category="c"), name="b")
    assert (run.parent / "LATEST").read_text().strip() == "b"
    assert not (run.parent / "latest").exists()


def test_demo_runs_sit_directly_under_out_beside_their_data(tmp_path, monkeypatch):
    import prn.data.demo
    made = []
    monkeypatch.setattr(prn.data.demo, "make_demo_dataset", lambda root, seed: made.append(root))
    monkeypatch.setattr(api, "fit", lambda cfg, run_dir, progress: run_dir)
    monkeypatch.setattr(api, "test", lambda run, **kw: {})
    from prn.demo import run_demo
    run = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert run.parent == tmp_path / "demo" and made == [tmp_path / "demo" / "data"]
    assert (tmp_path / "demo" / "latest").resolve() == run.resolve()


# ----------------------------------------------------------------------------- README commands

def _distribution(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _installed_by(project: dict, extra: str) -> set[str]:
    """Distributions `pip install '.[extra]'` asks for by name, following prn[other] references."""
    names, todo, seen = set(), list(project["dependencies"]), set()
    todo += project["optional-dependencies"][extra]
    while todo:
        req = todo.pop()
        name = _distribution(req)
        if name == _distribution(project["name"]):
            for other in re.search(r"\[(.*?)\]", req).group(1).split(","):
                if other.strip() not in seen:
                    seen.add(other.strip())
                    todo += project["optional-dependencies"][other.strip()]
        else:
            names.add(name)
    return names


def test_readme_install_brings_everything_the_tests_import():
    """README installs '.[dev]'; every third-party module a test imports must come from the
    runtime dependencies or the dev extra, so a fresh venv runs README's test command."""
    readme = (REPO / "README.md").read_text()
    assert "pip install -e '.[dev]'" in readme and 'python -m pytest -m "not slow"' in readme
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _installed_by(project, "dev")
    assert {"pytest", "pytest-timeout"} <= declared
    local = {p.stem for p in (REPO / "tests").glob("*.py")} | {"prn"}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for path in (REPO / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                dists = {_distribution(d) for d in providers.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, set()).add(path.name)
    assert not missing, f"imported by tests but not in pyproject dependencies or the dev extra: {missing}"
