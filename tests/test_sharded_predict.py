"""`torchrun -m prn predict`: the input list shared out by rank, one scores.csv merged by rank 0."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import torchrun  # noqa: E402

from prn import api  # noqa: E402


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_write_the_one_process_scores_in_input_order(calibrated_run, demo_root, tmp_path):
    folder = shutil.copytree(demo_root / "demo" / "test", tmp_path / "incoming")
    shutil.copytree(demo_root / "demo" / "test", folder / "again")  # 20 readable: the look is compared
    (folder / "good" / "broken.png").write_bytes(b"not an image")  # an error row keeps its place too
    one = api.predict(calibrated_run, folder, tmp_path / "one", progress=False, overlays=3, device="cpu")
    done = torchrun("predict", str(calibrated_run), str(folder), "--out", str(tmp_path / "two"),
                    "--overlays", "3", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{one.n_images} images" in done.stdout and done.stdout.count("images in") == 1  # rank 0 speaks
    a, b = _rows(one.csv), _rows(tmp_path / "two" / "scores.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == one.n_images
    for ra, rb in zip(a, b):
        assert (ra["prediction"], ra["error"], ra["regions"]) == (rb["prediction"], rb["error"], rb["regions"])
        if not ra["error"]:
            assert abs(float(ra["score"]) - float(rb["score"])) < 1e-5, ra["path"]
    assert sum(bool(r["error"]) for r in b) == 1
    regions_a = [json.loads(x) for x in (tmp_path / "one" / "regions.jsonl").read_text().splitlines()]
    regions_b = [json.loads(x) for x in (tmp_path / "two" / "regions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in regions_a] == [r["path"] for r in regions_b]
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "one") == files(tmp_path / "two")  # maps and the first 3 pictures, no rank folders
    # the images' look over both ranks' shares, compared once, as one process compares its own
    look_a, look_b = (json.loads((tmp_path / d / "appearance.json").read_text()) for d in ("one", "two"))
    assert look_a["images"] == look_b["images"] == one.n_images - 1
    for key in ("brightness", "detail"):
        assert abs(look_a[key] - look_b[key]) <= 1e-6 * abs(look_a[key]), key
    for rel in files(tmp_path / "one"):
        if rel.endswith(".npy"):
            np.testing.assert_allclose(np.load(tmp_path / "one" / rel), np.load(tmp_path / "two" / rel), atol=1e-5)


def test_fail_on_defect_is_refused_under_torchrun(calibrated_run, demo_root, tmp_path):
    done = torchrun("predict", str(calibrated_run), str(demo_root / "demo" / "test"), "--out",
                    str(tmp_path / "out"), "--fail-on-defect", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert done.returncode != 0 and "is for one process" in done.stderr
