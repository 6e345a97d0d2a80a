"""benchmarks/label_audit.py: a blind sheet of the highest-scoring and random good test images."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from conftest import load_script

from prn.data.split import Split

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_audit.py"


def test_sheet_mixes_the_top_goods_with_random_ones_and_reveal_counts_the_judgments(calibrated_run, tmp_path,
                                                                                   capsys):
    audit = load_script(SCRIPT)
    with open(calibrated_run / "predictions" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    goods = sorted((r for r in rows if r["label"] == "0"), key=lambda r: -float(r["score"]))
    out = tmp_path / "audit"
    audit.sheet(calibrated_run, out, top=1, n_random=2, seed=0)
    key = json.loads((out / "key.json").read_text())["crops"]
    assert [c["number"] for c in key] == [1, 2, 3]
    top = [c for c in key if c["group"] == "top"]
    assert [c["path"] for c in top] == [goods[0]["path"]]
    assert {c["path"] for c in key if c["group"] == "random"} <= {r["path"] for r in goods[1:]}
    for c in key:  # the crop is centred on a point of the original image
        with Image.open(audit.sample_of(Split.load(calibrated_run / "split.json").test, c["path"]).image_path) as im:
            assert 0 <= c["peak_xy"][0] <= im.width and 0 <= c["peak_xy"][1] <= im.height
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.size == (audit.COLUMNS * audit.SHOWN, audit.SHOWN)

    (out / "judged.txt").write_text("1 yes\n2 no\n")
    with pytest.raises(SystemExit, match="1 of the 3 crops are not judged"):
        audit.reveal(out, None)
    (out / "judged.txt").write_text("1 yes\n2 maybe\n3 no\n")
    with pytest.raises(SystemExit, match="not 'NUMBER yes|no|unsure'"):
        audit.reveal(out, None)
    top_number = top[0]["number"]
    (out / "judged.txt").write_text("".join(f"{n} {'yes' if n == top_number else 'no'}\n" for n in (1, 2, 3)))
    audit.reveal(out, None)
    shown = capsys.readouterr().out
    assert "| top | 1 | 1 | 0 | 0 |" in shown and "| random | 2 | 0 | 0 | 2 |" in shown
    assert "without the 1 goods judged defective" in shown


def test_images_are_found_by_their_path_where_file_names_repeat(tmp_path):
    from prn.data.sample import Sample
    audit = load_script(SCRIPT)
    samples = [Sample(tmp_path / "test" / kind / "000.png", None, 0, "good") for kind in ("crack", "good")]
    assert audit.sample_of(samples, "test/good/000.png") is samples[1]
    assert audit.sample_of(samples, (tmp_path / "test" / "crack" / "000.png").as_posix()) is samples[0]
    with pytest.raises(SystemExit, match="not among the split's good test images"):
        audit.sample_of(samples, "test/good/001.png")
