"""An unattended tool: runs survive being killed, bad settings and files fail clearly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.errors import CheckpointError, DataError, ExitStatus
from prn.model.backbone import BackboneWeightsError, create_encoder


def test_a_killed_fit_keeps_a_loadable_checkpoint_and_resumes_to_the_same_weights(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=4, steps_per_epoch=3)
    cfg.save(tmp_path / "cfg.yaml")
    reference = tmp_path / "reference"
    assert main(["fit", "--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(reference), "--quiet"]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "prn.cli", "fit", "--config", str(tmp_path / "cfg.yaml"),
                             "--run-dir", str(killed), "--quiet"],
                            # same thread count as this process: float sums depend on it
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    was_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not was_running:
        pytest.skip("the run finished before it could be killed on this machine")
    stopped_at = load_checkpoint(ckpt)["epoch"]  # loads: never a half-written file
    assert 1 <= stopped_at < 4
    assert main(["fit", "--resume", str(killed), "--quiet"]) == 0
    a = load_checkpoint(reference / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(ckpt)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_a_changed_architecture_fails_clearly(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    cfg.replace(use_attention=False, epochs=2).save(run / "config.yaml")
    with pytest.raises(CheckpointError, match="use_attention"):
        api.resume(run, progress=False)


def test_a_checkpoint_that_is_not_a_run_is_refused_by_test_and_predict(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    assert main(["predict", str(bogus), str(tmp_path)]) == ExitStatus.MODEL
    assert "not a prn checkpoint" in capsys.readouterr().err


def test_backbone_weights_of_another_architecture_fail_with_the_file_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(BackboneWeightsError, match="other.pth"):
        create_encoder("resnet18", str(path))
    with pytest.raises(BackboneWeightsError, match="other.pth"):
        create_encoder("tf_efficientnet_lite0", str(path))


def test_resnet18_offline_without_cached_weights_says_what_to_do(monkeypatch, tmp_path):
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(BackboneWeightsError) as info:
        create_encoder("resnet18", "imagenet")
    message = str(info.value)
    assert "--backbone-weights" in message and "tf_efficientnet_lite0" in message


def test_cli_fit_offline_with_resnet18_prints_the_advice_not_a_traceback(monkeypatch, demo_root, tmp_path, capsys):
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    code = main(["fit", "--dataset", "demo", "--root", str(demo_root), "--backbone", "resnet18", "--seen-anomalies", "2",
                 "--output-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == ExitStatus.MODEL and "--backbone-weights" in err and "Traceback" not in err


def test_a_category_without_normal_images_is_refused_before_training(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    split = api.make_split(cfg)
    split.train_normal = []
    with pytest.raises(DataError, match="defect-free"):
        api.fit(cfg, run_dir=tmp_path / "run", split=split, progress=False)


def test_more_seen_anomalies_than_exist_is_an_error_naming_the_count(demo_root, tiny_config, tmp_path, capsys):
    cfg = tiny_config(demo_root, tmp_path, seen_anomalies=50)
    cfg.save(tmp_path / "cfg.yaml")
    assert main(["fit", "--config", str(tmp_path / "cfg.yaml"), "--quiet"]) == ExitStatus.DATA
    assert "6" in capsys.readouterr().err


def test_predict_reports_a_corrupt_image_in_the_csv_and_strict_stops_on_it(demo_root, tiny_config,
                                                                            tmp_path, capsys):
    import csv
    cfg = tiny_config(demo_root, tmp_path, epochs=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "gone.png").symlink_to(tmp_path / "moved_away.png")  # a link left behind: named, not skipped
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert [r["path"] for r in rows] == ["broken.png", "gone.png"] and "broken.png" in rows[0]["error"]
    assert "gone.png: a link to" in rows[1]["error"] and "moved_away.png, which does not exist" in rows[1]["error"]
    assert rows[0]["score"] == rows[1]["score"] == "" and "2 unreadable" in capsys.readouterr().err
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "out2"), "--quiet",
                 "--strict"]) == 4  # ExitStatus.DATA
    assert "broken.png" in capsys.readouterr().err
