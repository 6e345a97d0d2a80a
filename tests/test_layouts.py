"""prn.data.layouts: each dataset layout built in tmp_path exactly as the real one ships."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prn.config import PRNConfig
from prn.data.layouts import list_categories, load_index
from prn.errors import DataError

KOLEKTORSDD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kolektorsdd"


def _img(path, hw=(16, 16), mode="RGB", value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = hw + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def _mask(path, hw=(16, 16), value=255, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(hw, dtype=dtype)
    m[2:6, 3:9] = value
    Image.fromarray(m).save(path)
    return path


def _rows(samples, base):
    """(image, mask, label, defect_type) with paths relative to base, for easy comparison."""
    def rel(p):
        return None if p is None else p.relative_to(base).as_posix()
    return [(rel(s.image_path), rel(s.mask_path), s.label, s.defect_type) for s in samples]


# --- MVTec AD ----------------------------------------------------------------------------------

def make_mvtec(root, category="widget", ext=".png"):
    cat = root / category
    for i in range(3):
        _img(cat / "train" / "good" / f"{i:03d}{ext}")
    for i in range(2):
        _img(cat / "test" / "good" / f"{i:03d}{ext}")
    for defect, n in (("crack", 2), ("hole", 1)):
        for i in range(n):
            _img(cat / "test" / defect / f"{i:03d}{ext}")
            _mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return cat


def _mvtec(root, category="widget", dataset="mvtec"):
    return load_index(PRNConfig(dataset=dataset, root=str(root), category=category))


def test_mvtec_index_pairs_each_defect_with_its_mask_and_labels_good_as_zero(tmp_path):
    cat = make_mvtec(tmp_path)
    index = _mvtec(tmp_path)
    assert (index.name, index.category, index.root) == ("mvtec", "widget", cat)
    assert _rows(index.train, cat) == [
        ("train/good/000.png", None, 0, "good"),
        ("train/good/001.png", None, 0, "good"),
        ("train/good/002.png", None, 0, "good")]
    assert _rows(index.test, cat) == [
        ("test/crack/000.png", "ground_truth/crack/000_mask.png", 1, "crack"),
        ("test/crack/001.png", "ground_truth/crack/001_mask.png", 1, "crack"),
        ("test/good/000.png", None, 0, "good"),
        ("test/good/001.png", None, 0, "good"),
        ("test/hole/000.png", "ground_truth/hole/000_mask.png", 1, "hole")]


def test_root_may_be_the_category_folder_itself(tmp_path):
    cat = make_mvtec(tmp_path)
    direct = _mvtec(cat, category="")
    via_parent = _mvtec(tmp_path)
    assert direct.root == cat and direct.category == "widget"
    assert direct.train == via_parent.train and direct.test == via_parent.test


@pytest.mark.parametrize("ext", [".jpg", ".JPG", ".jpeg", ".bmp", ".tif", ".TIFF"])
def test_other_image_extensions_are_accepted_in_any_case(tmp_path, ext):
    cat = make_mvtec(tmp_path, ext=ext)
    index = _mvtec(tmp_path)
    assert len(index.train) == 3 and len(index.test) == 5
    assert all(s.image_path.suffix == ext for s in index.train + index.test)
    assert index.test[0].mask_path == cat / "ground_truth" / "crack" / "000_mask.png"


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    cat = make_mvtec(tmp_path)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (cat / "train" / "good" / "._000.png").write_bytes(b"\0\1")  # macOS AppleDouble
    (cat / "train" / "good" / "readme.txt").write_text("hi")
    (cat / "license.txt").write_text("cc")
    assert len(_mvtec(tmp_path).train) == 3


def test_index_is_sorted_whatever_the_creation_order(tmp_path):
    for name in ("b.png", "c.png", "a.png", "10.png", "2.png"):
        _img(tmp_path / "w" / "train" / "good" / name)
    _img(tmp_path / "w" / "test" / "good" / "x.png")
    names = [s.image_path.name for s in _mvtec(tmp_path, "w").train]
    assert names == sorted(["b.png", "c.png", "a.png", "10.png", "2.png"])


def test_defective_image_without_mask_is_named(tmp_path):
    cat = make_mvtec(tmp_path)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask") as err:
        _mvtec(tmp_path)
    assert str(err.value).startswith(str(cat / "test" / "crack" / "001.png"))


def test_mask_without_image_is_named(tmp_path):
    cat = make_mvtec(tmp_path)
    orphan = _mask(cat / "ground_truth" / "crack" / "007_mask.png")
    with pytest.raises(DataError, match="no matching image") as err:
        _mvtec(tmp_path)
    assert str(err.value).startswith(str(orphan))


def test_masks_of_a_defect_type_without_test_folder_are_refused(tmp_path):
    cat = make_mvtec(tmp_path)
    orphan = _mask(cat / "ground_truth" / "scratch" / "000_mask.png")
    with pytest.raises(DataError, match="no matching image") as err:
        _mvtec(tmp_path)
    assert str(err.value).startswith(str(orphan))


def test_mask_of_other_size_names_both_files(tmp_path):
    cat = make_mvtec(tmp_path)
    bad = _mask(cat / "ground_truth" / "hole" / "000_mask.png", hw=(16, 20))
    with pytest.raises(DataError) as err:
        _mvtec(tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(bad)) and str(cat / "test" / "hole" / "000.png") in msg
    assert "20x16" in msg and "16x16" in msg


@pytest.mark.parametrize("folder", ["train/good", "test/crack"])
def test_empty_image_folder_is_refused(tmp_path, folder):
    cat = make_mvtec(tmp_path)
    for f in (cat / folder).iterdir():
        f.unlink()
    with pytest.raises(DataError, match="holds no images") as err:
        _mvtec(tmp_path)
    assert str(err.value).startswith(str(cat / folder))


def test_missing_test_folder_is_refused(tmp_path):
    cat = make_mvtec(tmp_path)
    for f in sorted((cat / "test").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (cat / "test").rmdir()
    with pytest.raises(DataError, match="not found") as err:
        _mvtec(tmp_path)
    assert str(err.value).startswith(str(cat / "test"))


def test_unknown_category_lists_the_available_ones(tmp_path):
    make_mvtec(tmp_path, "widget")
    make_mvtec(tmp_path, "bolt")
    with pytest.raises(DataError, match="available: bolt, widget") as err:
        _mvtec(tmp_path, "gear")
    assert str(err.value).startswith(str(tmp_path))


def test_missing_root_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        _mvtec(tmp_path / "nowhere")
    assert str(err.value).startswith(str(tmp_path / "nowhere"))


def test_list_categories_is_sorted_and_skips_other_folders(tmp_path):
    for name in ("zipper", "bottle", "metal_nut"):
        make_mvtec(tmp_path, name)
    (tmp_path / "docs").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    assert list_categories("mvtec", tmp_path) == ["bottle", "metal_nut", "zipper"]
    assert list_categories("mvtec", tmp_path / "bottle") == []  # root is a category itself
    assert list_categories("ksdd2", tmp_path) == []


def test_demo_dataset_name_reads_the_mvtec_layout_with_demo_as_default_category(tmp_path):
    cat = make_mvtec(tmp_path, "demo")
    index = load_index(PRNConfig(dataset="demo", root=str(tmp_path)))
    assert index.root == cat and index.name == "demo" and len(index.test) == 5


@pytest.mark.slow
def test_real_kolektorsdd_matches_its_readme_counts():
    if not KOLEKTORSDD.is_dir():
        pytest.skip("../shared/data/kolektorsdd is absent")
    index = load_index(PRNConfig(dataset="mvtec", root=str(KOLEKTORSDD)))
    assert len(index.train) == 278 and all(s.label == 0 for s in index.train)
    good = [s for s in index.test if s.label == 0]
    defect = [s for s in index.test if s.label == 1]
    assert len(good) == 69 and len(defect) == 52
    assert all(s.mask_path.name == f"{s.image_path.stem}_mask.png" for s in defect)
    assert all(s.image_path.suffix == ".jpg" for s in index.train + index.test)


# --- BTAD --------------------------------------------------------------------------------------

def make_btad(root, category="03", image_ext=".bmp"):
    cat = root / category
    for i in range(3):
        _img(cat / "train" / "ok" / f"{i:04d}{image_ext}")
    _img(cat / "test" / "ok" / f"0000{image_ext}")
    for i in range(2):
        _img(cat / "test" / "ko" / f"{i:04d}{image_ext}")
        _mask(cat / "ground_truth" / "ko" / f"{i:04d}.png")  # masks keep the stem, always .png
    return cat


def test_btad_pairs_bmp_images_with_png_masks_and_maps_ok_ko(tmp_path):
    cat = make_btad(tmp_path)
    make_btad(tmp_path, "01")
    index = load_index(PRNConfig(dataset="btad", root=str(tmp_path), category="03"))
    assert _rows(index.train, cat) == [(f"train/ok/000{i}.bmp", None, 0, "good") for i in range(3)]
    assert _rows(index.test, cat) == [
        ("test/ko/0000.bmp", "ground_truth/ko/0000.png", 1, "ko"),
        ("test/ko/0001.bmp", "ground_truth/ko/0001.png", 1, "ko"),
        ("test/ok/0000.bmp", None, 0, "good")]
    assert list_categories("btad", tmp_path) == ["01", "03"]


def test_btad_png_images_work_too(tmp_path):
    make_btad(tmp_path, "02", image_ext=".png")
    index = load_index(PRNConfig(dataset="btad", root=str(tmp_path), category="02"))
    assert [s.label for s in index.test] == [1, 1, 0]


def test_btad_defect_without_mask_is_named(tmp_path):
    cat = make_btad(tmp_path)
    (cat / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(DataError, match="has no mask") as err:
        load_index(PRNConfig(dataset="btad", root=str(tmp_path), category="03"))
    assert str(err.value).startswith(str(cat / "test" / "ko" / "0001.bmp"))


# --- DAGM 2007 ---------------------------------------------------------------------------------

def _dagm_split(folder, labels, header=True):
    """labels: list of 0/1 per image; writes NNNN.PNG, Label/Labels.txt and Label/NNNN_label.PNG."""
    lines = [str(len(labels))] if header else []
    for i, lab in enumerate(labels):
        _img(folder / f"{i:04d}.PNG", mode="L")  # DAGM: 8-bit grayscale
        if lab:
            _mask(folder / "Label" / f"{i:04d}_label.PNG")
            lines.append(f"{i + 1}\t1\t{i:04d}.PNG\t0\t{i:04d}_label.PNG")
        else:
            lines.append(f"{i + 1}\t0\t{i:04d}.PNG\t0\t")
    (folder / "Label").mkdir(parents=True, exist_ok=True)
    (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")


def make_dagm(root, category="Class1"):
    cat = root / category
    _dagm_split(cat / "Train", [0, 1, 0, 0, 1])
    _dagm_split(cat / "Test", [1, 0, 0, 1])
    return cat


def _dagm(root, category="Class1"):
    return load_index(PRNConfig(dataset="dagm", root=str(root), category=category))


def test_dagm_reads_labels_txt_and_keeps_defective_training_images(tmp_path):
    cat = make_dagm(tmp_path)
    index = _dagm(tmp_path)
    assert _rows(index.train, cat) == [
        ("Train/0000.PNG", None, 0, "good"),
        ("Train/0001.PNG", "Train/Label/0001_label.PNG", 1, "defect"),
        ("Train/0002.PNG", None, 0, "good"),
        ("Train/0003.PNG", None, 0, "good"),
        ("Train/0004.PNG", "Train/Label/0004_label.PNG", 1, "defect")]
    assert [s.label for s in index.test] == [1, 0, 0, 1]


def test_dagm_labels_with_spaces_and_no_count_line_parse_the_same(tmp_path):
    cat = make_dagm(tmp_path)
    labels = cat / "Train" / "Label" / "Labels.txt"
    lines = labels.read_text().splitlines()[1:]
    labels.write_text("\r\n".join("   ".join(line.split("\t")) for line in lines) + "\r\n")
    assert [s.label for s in _dagm(tmp_path).train] == [0, 1, 0, 0, 1]


def test_dagm_bad_label_reports_the_line(tmp_path):
    cat = make_dagm(tmp_path)
    labels = cat / "Test" / "Label" / "Labels.txt"
    lines = labels.read_text().splitlines()
    lines[2] = "2\tx\t0001.PNG\t0\t"
    labels.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 3") as err:
        _dagm(tmp_path)
    assert str(err.value).startswith(str(labels))


def test_dagm_image_not_in_labels_txt_is_named(tmp_path):
    cat = make_dagm(tmp_path)
    extra = _img(cat / "Test" / "0099.PNG", mode="L")
    with pytest.raises(DataError, match="not listed") as err:
        _dagm(tmp_path)
    assert str(err.value).startswith(str(extra))


def test_dagm_defect_whose_label_image_is_missing_is_named(tmp_path):
    cat = make_dagm(tmp_path)
    (cat / "Test" / "Label" / "0003_label.PNG").unlink()
    with pytest.raises(DataError, match="has no mask") as err:
        _dagm(tmp_path)
    assert str(err.value).startswith(str(cat / "Test" / "0003.PNG"))


def test_dagm_categories_are_class_folders(tmp_path):
    make_dagm(tmp_path, "Class10")
    make_dagm(tmp_path, "Class2")
    assert list_categories("dagm", tmp_path) == ["Class10", "Class2"]


# --- KolektorSDD2 ------------------------------------------------------------------------------

def make_ksdd2(root, gt_value=255):
    # train: 10000 defect-free (all-zero GT), 10001 defective; test: 20000 defective, 20001 free.
    for split, stems in (("train", ("10000", "10001")), ("test", ("20000", "20001"))):
        for stem in stems:
            _img(root / split / f"{stem}.png", hw=(40, 14))
            defective = stem in ("10001", "20000")
            _mask(root / split / f"{stem}_GT.png", hw=(40, 14), value=gt_value if defective else 0)
    return root


@pytest.mark.parametrize("gt_value", [255, 1])
def test_ksdd2_all_zero_gt_means_defect_free(tmp_path, gt_value):
    root = make_ksdd2(tmp_path, gt_value)
    index = load_index(PRNConfig(dataset="ksdd2", root=str(root)))
    assert _rows(index.train, root) == [
        ("train/10000.png", None, 0, "good"),
        ("train/10001.png", "train/10001_GT.png", 1, "defect")]
    assert _rows(index.test, root) == [
        ("test/20000.png", "test/20000_GT.png", 1, "defect"),
        ("test/20001.png", None, 0, "good")]


def test_ksdd2_image_without_gt_is_named(tmp_path):
    root = make_ksdd2(tmp_path)
    (root / "test" / "20001_GT.png").unlink()
    with pytest.raises(DataError, match="no ground-truth mask") as err:
        load_index(PRNConfig(dataset="ksdd2", root=str(root)))
    assert str(err.value).startswith(str(root / "test" / "20001.png"))


def test_ksdd2_gt_without_image_is_named(tmp_path):
    root = make_ksdd2(tmp_path)
    orphan = _mask(root / "train" / "10005_GT.png", hw=(40, 14))
    with pytest.raises(DataError, match="no matching image") as err:
        load_index(PRNConfig(dataset="ksdd2", root=str(root)))
    assert str(err.value).startswith(str(orphan))


# --- generic folder ----------------------------------------------------------------------------

def make_folder(root, n_normal=10, n_defect=3, mask_ext=".png"):
    for i in range(n_normal):
        _img(root / "good" / f"n{i:02d}.jpg")
    for i in range(n_defect):
        _img(root / "defect" / f"d{i}.png")
        _mask(root / "masks" / f"d{i}_mask{mask_ext}")
    return root


def _folder(root, **kw):
    return load_index(PRNConfig(dataset="folder", root=str(root), **kw))


def test_folder_layout_pairs_masks_by_suffix_with_any_extension(tmp_path):
    root = make_folder(tmp_path, mask_ext=".bmp")
    defects = [s for s in _folder(root).test if s.label == 1]
    assert _rows(defects, root) == [
        (f"defect/d{i}.png", f"masks/d{i}_mask.bmp", 1, "defect") for i in range(3)]


def test_folder_layout_holds_out_a_seeded_share_of_normals_for_testing(tmp_path):
    root = make_folder(tmp_path)
    held = {}
    for seed in range(6):
        index = _folder(root, test_normal_fraction=0.2, split_seed=seed)
        train = {s.image_path.name for s in index.train}
        test = {s.image_path.name for s in index.test if s.label == 0}
        assert len(train) == 8 and len(test) == 2 and not train & test
        assert train | test == {f"n{i:02d}.jpg" for i in range(10)}
        held[seed] = test
    again = {s.image_path.name for s in _folder(root, test_normal_fraction=0.2, split_seed=3).test
             if s.label == 0}
    assert again == held[3]
    assert len({frozenset(v) for v in held.values()}) > 1  # the seed matters


def test_folder_layout_uses_test_normal_dir_when_given(tmp_path):
    root = make_folder(tmp_path)
    for i in range(4):
        _img(root / "ok_test" / f"t{i}.png")
    index = _folder(root, test_normal_dir="ok_test")
    assert len(index.train) == 10
    test_normals = sorted(s.image_path.name for s in index.test if s.label == 0)
    assert test_normals == [f"t{i}.png" for i in range(4)]


def test_folder_layout_with_custom_names(tmp_path):
    _img(tmp_path / "ok" / "a.png")
    _img(tmp_path / "ok" / "b.png")
    _img(tmp_path / "ng" / "c.png")
    _mask(tmp_path / "gt" / "c.png")
    index = _folder(tmp_path, normal_dir="ok", abnormal_dir="ng", mask_dir="gt", mask_suffix="",
                    test_normal_fraction=0.5)
    assert len(index.train) == 1 and [s.mask_path.name for s in index.test if s.label] == ["c.png"]


def test_folder_layout_defect_without_mask_is_named(tmp_path):
    root = make_folder(tmp_path)
    (root / "masks" / "d1_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask") as err:
        _folder(root)
    assert str(err.value).startswith(str(root / "defect" / "d1.png"))


def test_folder_layout_mask_with_wrong_suffix_is_named(tmp_path):
    root = make_folder(tmp_path)
    stray = _mask(root / "masks" / "d1.png")
    with pytest.raises(DataError, match="not named like a mask") as err:
        _folder(root)
    assert str(err.value).startswith(str(stray))
