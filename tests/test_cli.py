import subprocess
import sys

import pytest

from prn.cli import build_parser, config_from_args, main
from prn.errors import ExitStatus


def test_prn_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "prn.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("fit", "test", "predict", "demo", "show-anomalies", "benchmark"):
        assert verb in out.stdout


def test_flags_presets_and_set_build_one_config(tmp_path):
    args = build_parser().parse_args([
        "fit", "--root", str(tmp_path), "--dataset", "btad", "--category", "02", "--preset", "cpu",
        "--epochs", "3", "--set", "use_attention=false", "--set", "attention_patch_divisors=[1, 2]"])
    cfg = config_from_args(args)
    assert (cfg.data.dataset, cfg.data.category, cfg.training.epochs) == ("btad", "02", 3)
    assert cfg.model.backbone == "tf_efficientnet_lite0"  # from the cpu preset
    assert cfg.model.use_attention is False and cfg.model.attention_patch_divisors == (1, 2)


def test_unknown_set_key_is_an_error_message_not_a_traceback(tmp_path, capsys):
    code = main(["fit", "--root", str(tmp_path), "--set", "epochz=3"])
    assert code == ExitStatus.USAGE
    assert "epochz" in capsys.readouterr().err


def test_missing_dataset_folder_is_reported_cleanly(tmp_path, capsys):
    code = main(["fit", "--dataset", "mvtec", "--root", str(tmp_path / "absent"), "--category", "bottle"])
    assert code == ExitStatus.DATA
    err = capsys.readouterr().err
    assert "absent" in err and "Traceback" not in err


@pytest.mark.parametrize("verb", ["test", "predict"])
def test_a_missing_run_folder_is_reported_cleanly(tmp_path, capsys, verb):
    argv = [verb, str(tmp_path / "no_run")] + ([str(tmp_path)] if verb == "predict" else [])
    assert main(argv) == ExitStatus.MODEL
    assert "not found" in capsys.readouterr().err
