"""benchmarks/train_goods_audit.py: good training images scored by models that did not train on them."""

import json
from pathlib import Path

import pytest
from PIL import Image
from conftest import load_script

from prn.data.split import Split

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_goods_audit.py"
SHORT = {"epochs": 1, "steps_per_epoch": 1}


def paths(samples) -> list[str]:
    return sorted(s.image_path.as_posix() for s in samples)


def test_each_half_is_scored_by_the_model_fitted_on_the_other_and_refit_leaves_out_the_list(
        calibrated_run, tmp_path, monkeypatch, capsys):
    audit = load_script(SCRIPT, monkeypatch)
    run_split = Split.load(calibrated_run / "split.json")
    goods = paths(run_split.train_normal)
    out = tmp_path / "audit"
    audit.halves(calibrated_run, out, SHORT)
    halves = {h: Split.load(out / f"half_{h}" / "split.json") for h in audit.HALVES}
    a, b = (set(paths(halves[h].train_normal)) for h in audit.HALVES)
    assert a | b == set(goods) and not a & b and abs(len(a) - len(b)) <= 1
    for split in halves.values():  # the rest of the split is the run's
        assert paths(split.test) == paths(run_split.test)
        assert paths(split.val_normal) == paths(run_split.val_normal)

    audit.score(out)
    rows = json.loads((out / "oof.json").read_text())
    assert sorted(r["path"] for r in rows) == goods
    trained = {"A": a, "B": b}
    for r in rows:
        assert r["path"] not in trained[r["model"]]
        assert r["above"] == (r["score"] >= r["threshold"])
    flagged = (out / "flagged.txt").read_text().splitlines()
    assert flagged == [r["path"] for r in rows if r["above"]]

    audit.sheet(out, n_random=2, seed=0)
    crops = json.loads((out / "key.json").read_text())["crops"]
    n_random = min(2, len(rows) - len(flagged))
    assert [c["group"] for c in crops].count("flagged") == len(flagged)
    assert [c["group"] for c in crops].count("random") == n_random
    assert {c["path"] for c in crops if c["group"] == "random"}.isdisjoint(flagged)
    layout = load_script(SCRIPT.parent / "label_audit.py")  # the sheet is label_audit's
    with Image.open(out / "sheet.png") as sheet:
        assert sheet.width == layout.COLUMNS * layout.SHOWN
    (out / "judged.txt").write_text("".join(f"{c['number']} {'yes' if c['group'] == 'flagged' else 'no'}\n"
                                            for c in crops))
    audit.reveal(out)
    shown = capsys.readouterr().out
    assert f"| flagged | {len(flagged)} | {len(flagged)} | 0 | 0 |" in shown
    assert f"| random | {n_random} | 0 | 0 | {n_random} |" in shown

    drop = tmp_path / "drop.txt"
    drop.write_text(goods[0] + "\n")
    audit.refit(calibrated_run, tmp_path / "refit", drop, SHORT)
    assert paths(Split.load(tmp_path / "refit" / "split.json").train_normal) == goods[1:]
    drop.write_text("/not/a/training/image.png\n")
    with pytest.raises(SystemExit, match="1 listed paths are not good training images"):
        audit.refit(calibrated_run, tmp_path / "refit2", drop, SHORT)
