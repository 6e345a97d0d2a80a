"""prn.data.split: the supervised few-shot protocol (paper A.2)."""

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest

from prn.data.sample import DatasetIndex, Sample
from prn import api
from prn.data.split import Split, drop_copies, few_shot_split
from prn.errors import DataError


def _good(name):
    return Sample(Path(f"/d/{name}.png"), None, 0, "good")


def _bad(name, kind):
    return Sample(Path(f"/d/{kind}/{name}.png"), Path(f"/d/gt/{kind}/{name}_mask.png"), 1, kind)


def make_index(type_sizes=None, n_train=6, n_test_good=5, name="mvtec", train_bad=()):
    """An in-memory index: type_sizes {defect type: number of test anomalies}."""
    type_sizes = type_sizes or {"crack": 3, "hole": 2, "cut": 2}
    test = [_good(f"t{i}") for i in range(n_test_good)]
    test += [_bad(f"{t}{i}", t) for t, n in type_sizes.items() for i in range(n)]
    train = [_good(f"n{i}") for i in range(n_train)] + [_bad(f"tr{i}", "defect") for i in train_bad]
    return DatasetIndex(name, "cat", Path("/d"), train, sorted(test, key=lambda s: s.image_path))


def test_seen_anomalies_move_from_test_to_train(tmp_path):
    index = make_index()
    split = few_shot_split(index, k=4, seed=0)
    assert len(split.train_anomalous) == 4
    assert all(s.label == 1 and s.mask_path is not None for s in split.train_anomalous)
    assert not set(split.train_anomalous) & set(split.test)
    assert sorted(split.test + split.train_anomalous, key=str) == sorted(index.test, key=str)
    assert split.train_normal == index.train
    assert (split.dataset, split.category, split.k, split.seed) == ("mvtec", "cat", 4, 0)


@pytest.mark.parametrize("seed", range(30))
def test_every_defect_type_is_seen_when_k_reaches_the_number_of_types(seed):
    index = make_index({"a": 1, "b": 2, "c": 5, "d": 8})
    counts = Counter(s.defect_type for s in few_shot_split(index, k=4, seed=seed).train_anomalous)
    assert counts == {"a": 1, "b": 1, "c": 1, "d": 1}


@pytest.mark.parametrize("k", range(17))
def test_types_stay_balanced_until_one_runs_out(k):
    sizes = {"a": 1, "b": 2, "c": 5, "d": 8}
    index = make_index(sizes)
    for seed in range(5):
        counts = Counter(s.defect_type for s in few_shot_split(index, k=k, seed=seed).train_anomalous)
        assert sum(counts.values()) == k
        for a in sizes:
            for b, size_b in sizes.items():
                # Round-robin: a type is ahead of another by at most one, unless that one is used up.
                assert counts[a] <= counts[b] + 1 or counts[b] == size_b


def test_images_within_a_type_are_drawn_uniformly():
    index = make_index({"crack": 6})
    picks = Counter()
    n_seeds = 3000
    for seed in range(n_seeds):
        picks.update(s.image_path.name for s in few_shot_split(index, k=2, seed=seed).train_anomalous)
    # Each of 6 images is taken with probability 2/6: 1000 +- 26 (one std) times.
    assert len(picks) == 6
    assert all(abs(c - n_seeds / 3) < 120 for c in picks.values()), picks


def test_type_order_is_random_so_each_type_can_come_first():
    index = make_index({"a": 3, "b": 3, "c": 3})
    firsts = Counter(few_shot_split(index, k=1, seed=seed).train_anomalous[0].defect_type
                     for seed in range(1500))
    assert all(abs(c - 500) < 80 for c in firsts.values()) and len(firsts) == 3, firsts


def test_same_seed_gives_the_same_split_and_other_seeds_differ():
    index = make_index({"crack": 10, "hole": 10})
    first = few_shot_split(index, k=5, seed=7)
    assert few_shot_split(index, k=5, seed=7).train_anomalous == first.train_anomalous
    others = {tuple(few_shot_split(index, k=5, seed=s).train_anomalous) for s in range(8)}
    assert len(others) > 1


def test_asking_for_more_anomalies_than_exist_says_how_many():
    with pytest.raises(DataError, match="asked for 8 .* only 7 anomalous") as err:
        few_shot_split(make_index(), k=8, seed=0)
    assert str(err.value).startswith("/d")


def test_negative_k_is_refused():
    with pytest.raises(DataError, match=">= 0"):
        few_shot_split(make_index(), k=-1, seed=0)


def test_zero_seen_anomalies_leaves_the_test_set_whole():
    index = make_index()
    split = few_shot_split(index, k=0, seed=3)
    assert split.train_anomalous == [] and split.test == index.test


def test_dagm_moves_training_anomalies_to_test_before_sampling():
    index = make_index({"defect": 4}, n_train=5, name="dagm", train_bad=range(3))
    split = few_shot_split(index, k=6, seed=0)  # 6 > 4 test anomalies: only possible after the move
    assert len(split.train_normal) == 5 and all(s.label == 0 for s in split.train_normal)
    assert len(split.train_anomalous) == 6
    assert sum(s.label for s in split.test) == 1  # 4 + 3 - 6
    assert split.excluded == []
    pooled = set(split.train_anomalous) | {s for s in split.test if s.label}
    assert pooled == {s for s in index.train + index.test if s.label}


def test_dagm_flag_applies_the_dagm_protocol_to_any_index():
    index = make_index({"defect": 2}, name="folder", train_bad=range(3))
    assert len(few_shot_split(index, k=5, seed=1, dagm=True).train_anomalous) == 5
    with pytest.raises(DataError, match="only 2"):
        few_shot_split(index, k=5, seed=1)


def test_training_anomalies_of_other_datasets_are_excluded_not_trained_on():
    index = make_index({"defect": 4}, n_train=5, name="ksdd2", train_bad=range(3))
    split = few_shot_split(index, k=2, seed=0)
    assert len(split.train_normal) == 5 and len(split.excluded) == 3
    assert not set(split.excluded) & (set(split.test) | set(split.train_anomalous))


def test_split_survives_a_json_round_trip(tmp_path):
    split = few_shot_split(make_index(train_bad=range(2), name="ksdd2"), k=3, seed=5)
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded == split
    assert isinstance(loaded.test[0].image_path, Path)
    # a retrain's added images keep their mark; the others write no field for it
    marked = dataclasses.replace(split, train_anomalous=[dataclasses.replace(split.train_anomalous[0], added=True)])
    marked.save(tmp_path / "marked.json")
    assert Split.load(tmp_path / "marked.json").train_anomalous[0].added
    assert "added" not in (tmp_path / "split.json").read_text()


def test_summary_counts_the_lists():
    split = few_shot_split(make_index(), k=4, seed=0)  # 6 train, 5 good + 7 bad in test
    summary = split.summary()
    assert {k: summary[k] for k in ("train_normal", "train_anomalous", "test_normal",
                                    "test_anomalous", "excluded")} == {
        "train_normal": 6, "train_anomalous": 4, "test_normal": 5, "test_anomalous": 3, "excluded": 0}
    assert sum(summary["seen_defect_types"].values()) == 4 and len(summary["seen_defect_types"]) == 3


@pytest.mark.parametrize("content", ["{not json", '{"dataset": "x"}', "[1, 2]"])
def test_broken_split_file_is_refused_with_its_path(tmp_path, content):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        Split.load(path)
    assert str(err.value).startswith(str(path))


def test_drop_copies_keeps_the_first_of_each_picture(tmp_path):
    a, b, c, d = (tmp_path / n for n in "abcd")
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other byte")  # a's size, not its bytes
    d.write_bytes(b"x")
    samples = [Sample(p, None, 0, "good") for p in (a, b, c, d)]
    kept, pairs = drop_copies(samples)
    assert kept == [samples[0], samples[2], samples[3]] and pairs == [(samples[1], samples[0])]
    assert drop_copies(samples[2:]) == (samples[2:], [])
    assert drop_copies([samples[3], samples[3]]) == ([samples[3]], [(samples[3], samples[3])])  # one file twice
    # files longer than the head that is read first: the same head, other tails, are not copies
    head = bytes(range(256)) * 256
    for name, tail in (("e", b"1"), ("f", b"2"), ("g", b"1")):
        (tmp_path / name).write_bytes(head + tail)
    long = [Sample(tmp_path / n, None, 0, "good") for n in "efg"]
    assert drop_copies(long) == (long[:2], [(long[2], long[0])])


def test_a_split_counts_each_picture_once(demo_root, tiny_config, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    category = root / "demo"
    shutil.copy(category / "train/good/000.png", category / "train/good/copy.png")
    shutil.copy(category / "test/hole/000.png", category / "test/hole/copy.png")
    shutil.copy(category / "ground_truth/hole/000_mask.png", category / "ground_truth/hole/copy_mask.png")
    split = api.make_split(tiny_config(root, tmp_path))
    assert sorted(str(s.image_path.relative_to(category)) for s in split.copies) == [
        "test/hole/copy.png", "train/good/copy.png"]
    used = split.train_normal + split.train_anomalous + split.val + split.test
    assert len({s.image_path.read_bytes() for s in used}) == len(used)
    err = capsys.readouterr().err
    assert "2 image(s)" in err and "train/good/copy.png = train/good/000.png" in err
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split and split.summary()["copies"] == 2
