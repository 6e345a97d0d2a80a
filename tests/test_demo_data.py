"""prn.data.demo: the synthetic MVTec-layout category."""


import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from prn.config import PRNConfig
from prn.data.demo import DEFECT_TYPES, _add_defect, make_demo_dataset
from prn.data.layouts import load_index
from prn.errors import DataError

SMALL = {"n_train": 4, "n_test_good": 3, "n_test_defect": 6, "size": 64}


def _pixels(path):
    return np.asarray(Image.open(path))


def test_demo_is_an_mvtec_category_with_the_requested_counts(tmp_path):
    cat = make_demo_dataset(tmp_path, **SMALL)
    assert cat == tmp_path / "demo"
    index = load_index(PRNConfig(dataset="demo", root=str(tmp_path)))
    assert len(index.train) == 4 and all(s.label == 0 for s in index.train)
    defects = [s for s in index.test if s.label == 1]
    assert sum(s.label == 0 for s in index.test) == 3 and len(defects) == 6
    assert sorted({s.defect_type for s in defects}) == sorted(DEFECT_TYPES)
    for s in defects:
        assert s.mask_path == cat / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
        assert set(np.unique(_pixels(s.mask_path))) == {0, 255}
        assert _pixels(s.image_path).shape == (64, 64, 3)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        np.testing.assert_array_equal(_pixels(a / rel), _pixels(b / rel))
    assert not np.array_equal(_pixels(a / "train/good/000.png"), _pixels(c / "train/good/000.png"))


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_each_defect_changes_exactly_the_pixels_of_its_mask(kind):
    for seed in range(20):
        image = np.full((96, 96, 3), 140.0, dtype=np.float32)
        mask = _add_defect(image, kind, np.random.default_rng(seed))
        changed = np.abs(np.rint(image) - 140).max(axis=2) > 0  # as saved: rounded to uint8
        assert mask.any()
        np.testing.assert_array_equal(changed, mask)


def test_defects_stand_out_locally_but_not_in_global_brightness(tmp_path):
    make_demo_dataset(tmp_path, seed=1, n_train=2, n_test_good=12, n_test_defect=12, size=128)
    index = load_index(PRNConfig(dataset="demo", root=str(tmp_path)))
    for s in (s for s in index.test if s.label == 1):
        image = _pixels(s.image_path).astype(float)
        mask = _pixels(s.mask_path) > 0
        deviation = np.linalg.norm(image - np.median(image.reshape(-1, 3), axis=0), axis=2)
        # Clearly visible: inside the mask the surface departs over twice as far from its median.
        assert deviation[mask].mean() > 2 * deviation[~mask].mean(), s.image_path
    # Not trivial: mean brightness alone does not tell defective from good images.
    labels = [s.label for s in index.test]
    brightness = [_pixels(s.image_path).mean() for s in index.test]
    assert roc_auc_score(labels, brightness) < 0.8


def test_demo_with_default_arguments_writes_forty_training_images(tmp_path):
    make_demo_dataset(tmp_path)
    assert len(list((tmp_path / "demo" / "train" / "good").glob("*.png"))) == 40


def test_demo_reuses_its_folder_and_replaces_it_when_arguments_change(tmp_path):
    cat = make_demo_dataset(tmp_path, **SMALL)
    stamp = (cat / "train" / "good" / "000.png").stat().st_mtime_ns
    make_demo_dataset(tmp_path, **SMALL)
    assert (cat / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    make_demo_dataset(tmp_path, **{**SMALL, "n_train": 2})
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == ["000.png", "001.png"]


def test_demo_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by make_demo_dataset") as err:
        make_demo_dataset(tmp_path, **SMALL)
    assert str(err.value).startswith(str(tmp_path / "demo"))
    assert (tmp_path / "demo" / "precious.txt").read_text() == "keep me"
