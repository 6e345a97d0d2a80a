"""Seen anomalies with a mask, a box, or an image label alone: what the layout reads, what each
training item teaches, the loss of weak annotations, and pixel metrics only where masks are truth."""

import shutil

import numpy as np
import pytest
import torch

from prn import api
from prn.anomalies.compose import AnomalyGenerator, TrainingSet
from prn.config import PRNConfig
from prn.data.datasets import boxes_of, load_training_arrays
from prn.data.layouts import load_index
from prn.data.split import Split
from prn.errors import DataError
from prn.model.loss import prn_loss, weak_loss

S = 32


def test_boxes_of_fills_the_bounding_box_of_each_region():
    mask = np.zeros((10, 12), bool)
    mask[1, 2] = mask[2, 3] = True          # diagonal neighbours: one 8-connected region
    mask[7:9, 9] = True
    box = boxes_of(mask)
    assert box[1:3, 2:4].all() and box[7:9, 9].all() and box.sum() == 4 + 2


@pytest.fixture
def annotated_root(demo_root, tmp_path):
    """The demo category with one defect's mask renamed to a box and another's removed."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    gt = root / "demo" / "ground_truth"
    masks = sorted(gt.rglob("*_mask.png"))
    masks[0].rename(masks[0].with_name(masks[0].name.replace("_mask", "_box")))
    masks[1].unlink()
    key = lambda m: (m.parent.name, m.name.replace("_mask.png", ""))  # (defect type, stem)
    return root, key(masks[0]), key(masks[1])


def test_the_layout_reads_boxes_and_refuses_or_accepts_label_only_defects(annotated_root):
    root, boxed, bare = annotated_root
    cfg = PRNConfig(dataset="demo", root=str(root), category="demo")
    with pytest.raises(DataError, match=f"{bare[1]}.*has no mask.*allow_label_only"):
        load_index(cfg)
    index = load_index(cfg.replace(allow_label_only=True))
    by_stem = {(s.defect_type, s.image_path.stem): s for s in index.test}
    assert by_stem[boxed].annotation == "box" and by_stem[boxed].mask_path.name == f"{boxed[1]}_box.png"
    assert by_stem[bare].annotation == "label" and by_stem[bare].mask_path is None
    assert not by_stem[bare].pixel_exact and not by_stem[boxed].pixel_exact
    others = [s for k, s in by_stem.items() if k not in (boxed, bare)]
    assert all(s.pixel_exact for s in others)
    # split.json keeps what each image is
    split = Split(train_normal=[], train_anomalous=[by_stem[boxed], by_stem[bare]], test=[], dataset="demo",
                  category="demo", k=2, seed=0)
    again = Split.from_dict(split.to_dict())
    assert [s.annotation for s in again.train_anomalous] == ["box", "label"]


def _seen(annotation):
    image = np.full((S, S, 3), 120, np.uint8)
    mask = np.zeros((S, S), bool)
    mask[10:14, 10:20] = True
    image[mask] = 250
    if annotation == "box":
        mask = boxes_of(mask)
    elif annotation == "label":
        mask = np.zeros_like(mask)
    return image, mask, annotation


@pytest.mark.parametrize("annotation", ["mask", "box", "label"])
def test_each_seen_item_teaches_what_its_annotation_says(annotation):
    cfg = PRNConfig(image_size=S, heterologous_anomalies=False, seen_fraction=0.25, batch_size=8)
    gen = AnomalyGenerator(cfg, [_seen(annotation)], "texture")
    data = TrainingSet([np.full((S, S, 3), 100, np.uint8)], gen, cfg)
    item = data[("seen", 0, 3)]
    weight, mask = item["weight"][0], item["mask"][0]
    assert item["label"] == 1.0 and item["weak"] == float(annotation != "mask")
    if annotation == "mask":
        assert weight.min() == 1 and mask.sum() > 0
    elif annotation == "box":
        assert torch.equal(weight, 1 - mask) and mask.sum() > 0   # the box's inside does not count
    else:
        assert weight.sum() == 0 and mask.sum() == 0               # a label alone counts no pixel
    normal = data[("normal", 0, 0)]
    assert normal["label"] == 0.0 and normal["weak"] == 0.0 and normal["weight"].min() == 1
    # extended anomalies come from seen anomalies with a region only
    assert gen.can_extend == (annotation != "label")
    if annotation == "box":
        ext = data[("extended", 0, 5)]
        assert ext["weak"] == 1.0 and torch.equal(ext["weight"], 1 - ext["mask"])


def test_weak_loss_asks_the_top_pixels_inside_the_region_to_be_high():
    logits = torch.full((2, 1, 8, 8), -4.0)
    region = torch.zeros(2, 1, 8, 8)
    region[0, 0, :2, :2] = 1
    logits[0, 0, 0, 0] = 4.0                          # high inside image 0's box
    logits[1, 0, 7, 7] = 4.0                          # image 1: a label alone, anywhere counts
    weak = torch.tensor([1.0, 1.0])
    got = weak_loss(logits, region, weak, top_k=1)
    want = -torch.log(torch.sigmoid(torch.tensor(4.0)))
    assert torch.allclose(got, want)
    logits[0, 0, 0, 0] = -4.0
    logits[0, 0, 5, 5] = 4.0                          # high, but outside the box: no credit
    assert weak_loss(logits, region, weak, top_k=1) > got
    assert weak_loss(logits, region, torch.zeros(2), top_k=1) == 0


def test_the_pixel_loss_leaves_out_the_pixels_of_weight_zero_and_is_the_papers_with_all():
    g = torch.Generator().manual_seed(0)
    logits, mask = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    cfg = PRNConfig().training
    plain, _ = prn_loss(logits, mask, cfg)
    assert torch.equal(prn_loss(logits, mask, cfg, torch.ones_like(mask))[0], plain)
    weight = torch.zeros_like(mask)
    weight[0] = 1
    assert torch.allclose(prn_loss(logits, mask, cfg, weight)[0], prn_loss(logits[:1], mask[:1], cfg)[0])


def test_seen_annotation_makes_boxes_or_drops_masks_of_the_seen_anomalies(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    split = api.make_split(cfg)
    _, as_given = load_training_arrays(cfg, split)
    _, boxes = load_training_arrays(cfg.replace(seen_annotation="box"), split)
    _, labels = load_training_arrays(cfg.replace(seen_annotation="label"), split)
    for (_, m, a), (_, b, ba), (_, l, la) in zip(as_given, boxes, labels):
        assert a == "mask" and ba == "box" and la == "label"
        assert np.array_equal(b, boxes_of(m)) and (b >= m).all() and not l.any()


@pytest.mark.parametrize("annotation", ["box", "label"])
def test_a_run_trains_on_weak_annotations_and_reports_pixel_metrics_on_exact_masks(
        demo_root, tiny_config, tmp_path, annotation):
    cfg = tiny_config(demo_root, tmp_path, seen_annotation=annotation, seen_fraction=0.25, epochs=1,
                      image_score="head")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    import csv
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert float(rows[-1]["weak"]) > 0 and float(rows[-1]["image"]) > 0   # both losses trained
    assert float(rows[-1]["loss"]) > float(rows[-1]["smooth_l1"]) + 5 * float(rows[-1]["focal"])
    metrics = api.test(run, progress=False, overlays=0)
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["image_auroc"] <= 1
