"""benchmarks/threshold_tails.py: calibration rules judged from the files runs already have."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "threshold_tails.py"


def make_run(folder: Path, held_out: np.ndarray, good: np.ndarray, bad: np.ndarray) -> None:
    (folder / "predictions").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"root": "/data/parts"}, "model": {"top_k": 100}}))
    (folder / "calibration.json").write_text(json.dumps({"normal_scores": held_out.tolist()}))
    lines = ["path,score,normalized_score,prediction,label,error"]
    lines += [f"test/good/{i}.png,{s},,,0," for i, s in enumerate(good)]
    lines += [f"test/bad/{i}.png,{s},,,1," for i, s in enumerate(bad)]
    (folder / "predictions" / "scores.csv").write_text("\n".join(lines) + "\n")


def test_every_rule_is_judged_on_the_runs_test_goods_and_defects(tmp_path):
    rng = np.random.default_rng(0)
    held_out = rng.uniform(0.05, 0.2, 28)
    # two good parts above any threshold the fold can set, half the defects under every one
    good = np.r_[rng.uniform(0.05, 0.2, 98), 0.9, 0.95]
    bad = np.r_[np.full(10, 0.99), np.full(10, 0.01)]
    make_run(tmp_path / "runs" / "a", held_out, good, bad)
    (tmp_path / "runs" / "b").mkdir()  # a folder without a run's files is skipped
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs"), "--draws", "2"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| parts |")]
    rules = {r[2] for r in rows}
    assert rules == {"gumbel", "gumbel_logit", "normal", "conformal", "largest"}
    split = {r[2]: r for r in rows if r[1] == "as split"}
    assert all(r[3] == "1" for r in split.values())  # one run
    pooled = [r for r in rows if r[1] == "pooled"]
    assert pooled and all(r[3] == "2" for r in pooled)  # two draws
    for r in split.values():
        frr, recall = float(r[4]), float(r[7].rstrip(" |"))
        assert frr >= 2.0  # the two high good parts are rejected whatever the rule
        assert recall == 50.0
