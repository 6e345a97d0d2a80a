"""The few-shot split's records by value: summary fields, the split.json round trip and its
tolerance of older files, the messages of a bad split file."""

import json
from pathlib import Path

import pytest

from prn.data.sample import DatasetIndex, Sample
from prn.data.split import Split, few_shot_split
from prn.errors import DataError


def good(name):
    return Sample(Path(f"/d/good/{name}.png"), None, 0, "good")


def bad(name, kind):
    return Sample(Path(f"/d/{kind}/{name}.png"), Path(f"/d/gt/{kind}/{name}_mask.png"), 1, kind)


def index():
    test = [good(f"t{i}") for i in range(3)] + [bad(f"c{i}", "crack") for i in range(3)] + \
        [bad(f"h{i}", "hole") for i in range(2)]
    return DatasetIndex("mvtec", "bottle", Path("/d"), [good(f"n{i}") for i in range(5)], test)


def test_summary_names_dataset_category_k_and_seed():
    summary = few_shot_split(index(), k=3, seed=7).summary()
    assert {k: summary[k] for k in ("dataset", "category", "k", "seed")} == \
        {"dataset": "mvtec", "category": "bottle", "k": 3, "seed": 7}
    assert (summary["train_normal"], summary["train_anomalous"]) == (5, 3)
    assert (summary["test_normal"], summary["test_anomalous"]) == (3, 2)
    assert summary["seen_defect_types"] == {"crack": 2, "hole": 1} or \
        summary["seen_defect_types"] == {"crack": 1, "hole": 2}


def test_split_records_the_category_folder_as_root():
    assert few_shot_split(index(), k=1, seed=0).root == "/d"


def test_saved_split_loads_back_equal(tmp_path):
    split = few_shot_split(index(), k=3, seed=1)
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split


def test_a_split_file_without_optional_lists_or_root_loads_with_empty_ones(tmp_path):
    split = few_shot_split(index(), k=2, seed=0)
    d = {k: v for k, v in split.to_dict().items() if k in ("dataset", "category", "k", "seed", "train_normal",
                                                           "train_anomalous", "test")}
    (tmp_path / "old.json").write_text(json.dumps(d))
    loaded = Split.load(tmp_path / "old.json")
    assert loaded.root == "" and loaded.excluded == []
    assert loaded.train_anomalous == split.train_anomalous and loaded.test == split.test


def test_a_missing_split_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match=r"nope\.json: cannot read split file"):
        Split.load(path)


def test_a_split_file_missing_a_key_names_the_error_type(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"dataset": "mvtec"}))
    with pytest.raises(DataError, match=r"split\.json: not a valid split file \(KeyError"):
        Split.load(tmp_path / "split.json")


def test_summary_counts_the_validation_fold():
    split = few_shot_split(index(), k=3, seed=0)
    split.val_normal, split.val_anomalous = split.train_normal[:2], split.train_anomalous[:1]
    summary = split.summary()
    assert (summary["val_normal"], summary["val_anomalous"]) == (2, 1)
