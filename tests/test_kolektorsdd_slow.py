"""Integration on the real KolektorSDD copy (../shared/data/kolektorsdd); run with -m slow."""

import csv
from pathlib import Path

import pytest

from prn import api
from prn.config import PRNConfig

KSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "kolektorsdd"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (KSDD / "train").is_dir(), reason="KolektorSDD copy not present")]


def test_fit_and_test_on_kolektorsdd_follow_the_protocol_end_to_end(tmp_path):
    cfg = PRNConfig(dataset="mvtec", root=str(KSDD), backbone="tf_efficientnet_lite0", image_size=128,
                    epochs=1, batch_size=8, steps_per_epoch=2, num_workers=0, device="cpu",
                    output_dir=str(tmp_path))
    run = api.fit(cfg, progress=False)
    assert run.parent.name == "kolektorsdd"
    split = api.Split.load(run / "split.json")
    # 278 good training pictures and 52 cracks, 16 of them stored twice (14 good, 2 cracks): each counts once
    assert len(split.copies) == 16
    assert (len(split.train_normal) + len(split.val_normal), len(split.train_anomalous) + len(split.val_anomalous),
            len(split.test)) == (278 - 14, 10, 69 + 52 - 2 - 10)
    assert not {s.image_path for s in split.train_anomalous} & {s.image_path for s in split.test}
    metrics = api.test(run, progress=False, overlays=2)
    for key in ("image_auroc", "pixel_auroc", "pro", "pixel_ap"):
        assert 0.0 <= metrics[key] <= 1.0, key
    rows = list(csv.DictReader(open(run / "predictions" / "scores.csv")))
    assert len(rows) == 109 and sum(int(r["label"]) for r in rows) == 40
