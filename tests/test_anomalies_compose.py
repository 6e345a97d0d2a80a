"""AnomalyGenerator switches, TrainingSet items, 2:1:1 batches, DataLoader workers, picture grids."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from types import SimpleNamespace

from prn.anomalies.compose import (AnomalyGenerator, BalancedBatchSampler, EpochBatches, TrainingSet,
                                  seen_draw_weights)
from prn.anomalies.show import show_anomalies
from prn.anomalies.target_areas import foreground_mask
from prn.config import PRNConfig

from anomaly_images import S, rng, object_image


def config(**changes):
    return PRNConfig(**{"image_size": S, "batch_size": 8, **changes})


def seen_anomalies(n=2, box=(25, 33, 28, 40), colour=(240, 240, 30), first=50):
    """n object images, each with a defect painted over the rows and columns of ``box``."""
    out = []
    for k in range(n):
        image = object_image(first + k)
        mask = np.zeros((S, S), bool)
        mask[box[0]:box[1], box[2]:box[3]] = True
        image[mask] = colour
        out.append((image, mask))
    return out


NORMALS = [object_image(s) for s in range(6)]


def check_sample(normal, image, mask, target=None):
    assert image.shape == normal.shape and image.dtype == np.uint8
    assert mask.dtype == bool and mask.any()
    assert np.array_equal(mask, (image != normal).any(axis=-1))
    if target is not None:
        assert not (mask & ~target).any()


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_every_strategy_keeps_the_invariants_for_several_seeds(kind):
    gen = AnomalyGenerator(config(), seen_anomalies(), kind)
    assert gen.strategies == ["extended", "heterologous", "homologous"]
    for strategy in gen.strategies:
        for s in range(4):
            normal = NORMALS[s]
            image, mask, target = gen.make(strategy, normal, rng(s))
            check_sample(normal, image, mask, target)
            again = gen.make(strategy, normal, rng(s))
            assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)


def test_object_anomalies_stay_on_the_estimated_foreground():
    gen = AnomalyGenerator(config(), seen_anomalies(), "object")
    for s in range(6):
        normal = NORMALS[s]
        fg = foreground_mask(normal)
        assert fg.mean() < 0.5
        for method in (gen.extended, gen.simulated):
            _, mask = method(normal, rng(s))
            assert not (mask & ~fg).any()


def test_target_areas_off_means_the_whole_image():
    gen = AnomalyGenerator(config(target_areas=False), seen_anomalies(), "object")
    for s in range(3):
        _, _, target = gen.make("homologous", NORMALS[s], rng(s))
        assert target.all()
    # With TA off, object anomalies may leave the foreground.
    outside = 0
    for s in range(12):
        _, mask = gen.simulated(NORMALS[s % 6], rng(s))
        outside += (mask & ~foreground_mask(NORMALS[s % 6])).sum()
    assert outside > 0


def test_without_seen_anomalies_extended_slots_become_simulated():
    for cfg, seen in [(config(), []), (config(extended_anomalies=False), seen_anomalies())]:
        gen = AnomalyGenerator(cfg, seen, "texture")
        assert not gen.can_extend
        with pytest.raises(ValueError, match="extended anomalies are not available"):
            gen.extended(NORMALS[0], rng())
        image, mask, kind = gen.generate("extended", NORMALS[0], rng())
        assert kind == "simulated"
        check_sample(NORMALS[0], image, mask)


def test_seen_anomalies_with_empty_masks_are_ignored():
    image, _ = seen_anomalies(1)[0]
    gen = AnomalyGenerator(config(), [(image, np.zeros((S, S), bool))], "texture")
    assert not gen.can_extend


def test_a_retrains_added_anomalies_fill_their_share_of_the_seen_slots():
    samples = [SimpleNamespace(added=a) for a in (False, False, False, True)]
    weights = seen_draw_weights(samples, 0.5)
    assert weights == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert seen_draw_weights(samples, 0.0) is None and seen_draw_weights(samples[:3], 0.5) is None
    # the added one is told apart by its annotation (a box): about half the draws, not a quarter
    seen = [(*item, "mask") for item in seen_anomalies(3)] + [(*seen_anomalies(1)[0], "box")]
    gen = AnomalyGenerator(config(), seen, "texture", seen_weights=weights)
    r = rng(3)
    share = np.mean([gen._seen_as_itself(r)[2] == "box" for _ in range(400)])
    assert 0.42 < share < 0.58
    uniform = AnomalyGenerator(config(), seen, "texture")
    assert uniform.seen_p is None and 0.17 < np.mean([uniform._seen_as_itself(r)[2] == "box" for _ in range(400)]) < 0.33
    with pytest.raises(ValueError, match="seen_weights"):
        AnomalyGenerator(config(), seen, "texture", seen_weights=[1.0])


def test_with_both_simulated_kinds_off_simulated_slots_become_extended():
    gen = AnomalyGenerator(config(heterologous_anomalies=False, homologous_anomalies=False),
                           seen_anomalies(), "texture")
    assert gen.strategies == ["extended"]
    image, mask, kind = gen.generate("simulated", NORMALS[1], rng(1))
    assert kind == "extended"
    check_sample(NORMALS[1], image, mask)


def test_only_homologous_is_used_when_it_is_the_only_simulated_kind():
    gen = AnomalyGenerator(config(heterologous_anomalies=False), seen_anomalies(), "texture")
    assert gen.simulated_strategies == ["homologous"] and gen.textures is None


@pytest.mark.parametrize("cfg, seen", [
    (config(extended_anomalies=False, heterologous_anomalies=False, homologous_anomalies=False), seen_anomalies()),
    (config(heterologous_anomalies=False, homologous_anomalies=False), []),
])
def test_no_available_strategy_is_a_clear_error(cfg, seen):
    with pytest.raises(ValueError, match="no anomaly generation strategy is available"):
        AnomalyGenerator(cfg, seen, "texture")


def test_unknown_category_kind_is_refused():
    with pytest.raises(ValueError, match="category_kind"):
        AnomalyGenerator(config(), [], "metal")


# ---------------------------------------------------------------- TrainingSet

def training_set(**changes):
    cfg = config(**changes)
    return TrainingSet(NORMALS, AnomalyGenerator(cfg, seen_anomalies(), "object"), cfg), cfg


def test_normal_items_are_the_images_with_an_empty_mask():
    data, _ = training_set()
    item = data[("normal", 2, 123)]
    assert item["kind"] == "normal"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
    # scaled exactly as inference scales its inputs (prn.preprocess.to_tensor)
    expected = TF.to_dtype(torch.from_numpy(NORMALS[2]).permute(2, 0, 1), torch.float32, scale=True)
    assert torch.equal(item["image"], expected)
    assert item["mask"].shape == (1, S, S) and item["mask"].sum() == 0


@pytest.mark.parametrize("kind", ["extended", "simulated"])
def test_anomalous_items_are_seeded_tensors_in_range(kind):
    data, _ = training_set()
    item = data[(kind, 1, 77)]
    assert item["kind"] == kind
    image, mask = item["image"], item["mask"]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert torch.isfinite(image).all()
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    changed = (image * 255).round().to(torch.uint8) != torch.from_numpy(NORMALS[1]).permute(2, 0, 1)
    assert torch.equal(changed.any(0), mask[0].bool())
    again = data[(kind, 1, 77)]
    assert torch.equal(again["image"], image) and torch.equal(again["mask"], mask)
    assert not torch.equal(data[(kind, 1, 78)]["image"], image)


def _as_uint8(image):
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("flips, expected", [("lr", {"as is", "lr"}), ("ud", {"as is", "ud"}),
                                             ("both", {"as is", "lr", "ud", "lr+ud"})])
def test_normal_flips_mirror_the_image_before_anything_is_drawn_on_it(flips, expected):
    data, _ = training_set(normal_flips=flips)
    variants = {i: {"as is": n, "lr": n[:, ::-1], "ud": n[::-1], "lr+ud": n[::-1, ::-1]} for i, n in enumerate(NORMALS)}
    assert all(not np.array_equal(v["as is"], v[m]) for v in variants.values() for m in ("lr", "ud", "lr+ud"))
    seen = set()
    for seed in range(40):
        image = _as_uint8(data[("normal", 2, seed)]["image"])
        found = [name for name, v in variants[2].items() if np.array_equal(image, v)]
        assert len(found) == 1
        seen.add(found[0])
    assert seen == expected
    # a simulated anomaly is drawn on the mirrored image: outside its mask the item is one of them
    for seed in range(10):
        item = data[("simulated", 1, seed)]
        image, outside = _as_uint8(item["image"]), item["mask"][0].numpy() == 0
        assert outside.any() and (~outside).any()
        assert any(np.array_equal(image[outside], v[outside]) for v in variants[1].values())


# ---------------------------------------------------------------- BalancedBatchSampler

def test_batches_are_two_to_one_to_one_and_cover_the_normals():
    cfg = config(batch_size=8)
    sampler = BalancedBatchSampler(16, cfg, seed=3, epoch=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(16 / 4)
    for batch in batches:
        assert [k for k, _, _ in batch] == ["normal"] * 4 + ["extended"] * 2 + ["simulated"] * 2
        assert all(0 <= i < 16 for _, i, _ in batch)
    normal_indices = [i for b in batches for k, i, _ in b if k == "normal"]
    assert sorted(normal_indices) == list(range(16))
    seeds = [s for b in batches for _, _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_sampler_is_a_function_of_seed_and_epoch():
    cfg = config(batch_size=8)
    a = list(BalancedBatchSampler(10, cfg, seed=1, epoch=2))
    assert a == list(BalancedBatchSampler(10, cfg, seed=1, epoch=2))
    assert a != list(BalancedBatchSampler(10, cfg, seed=1, epoch=3))
    assert a != list(BalancedBatchSampler(10, cfg, seed=2, epoch=2))


def test_sampler_steps_follow_config_or_argument():
    assert len(list(BalancedBatchSampler(10, config(batch_size=8, steps_per_epoch=7), 0, 0))) == 7
    assert len(BalancedBatchSampler(10, config(batch_size=8), 0, 0, steps=2)) == 2
    # Fewer normal images than normal slots: they repeat within a batch.
    batch = next(iter(BalancedBatchSampler(3, config(batch_size=16), 0, 0)))
    normals = [i for k, i, _ in batch if k == "normal"]
    assert len(normals) == 8 and set(normals) == {0, 1, 2}


def test_dataloader_with_two_workers_gives_the_same_batch_as_without():
    data, cfg = training_set()
    sampler = BalancedBatchSampler(len(NORMALS), cfg, seed=0, epoch=1, steps=1)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(data, batch_sampler=sampler, num_workers=workers)
        batches.append(next(iter(loader)))
    a, b = batches
    assert a["image"].shape == (8, 3, S, S) and a["mask"].shape == (8, 1, S, S)
    assert a["kind"] == b["kind"] == ["normal"] * 4 + ["extended"] * 2 + ["simulated"] * 2
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert (a["mask"][4:].flatten(1).sum(1) > 0).all() and a["mask"][:4].sum() == 0


def test_one_loader_over_the_epochs_gives_each_epochs_batches_in_order():
    # prn.train keeps one DataLoader (one set of workers) for the whole fit: its batches must be
    # those of a loader an epoch, epoch after epoch, with workers reading ahead across the seam
    data, cfg = training_set()
    samplers = [BalancedBatchSampler(len(NORMALS), cfg, seed=0, epoch=e, steps=2) for e in (1, 2)]
    chained = EpochBatches(samplers)
    assert len(chained) == 4 and list(chained) == list(samplers[0]) + list(samplers[1])
    one = list(DataLoader(data, batch_sampler=chained, num_workers=2))
    apart = [b for s in samplers for b in DataLoader(data, batch_sampler=s, num_workers=0)]
    assert len(one) == len(apart) == 4
    for a, b in zip(one, apart):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(one[1]["image"], one[2]["image"])  # the two epochs draw differently
    assert len(EpochBatches([])) == 0 and list(EpochBatches([])) == []


# ---------------------------------------------------------------- show_anomalies

def test_show_anomalies_writes_one_grid_per_enabled_strategy(tmp_path):
    gen = AnomalyGenerator(config(), seen_anomalies(), "object")
    paths = show_anomalies(NORMALS, gen, tmp_path / "out", n=3, seed=0)
    assert [p.name for p in paths] == ["anomalies_extended.png", "anomalies_heterologous.png",
                                       "anomalies_homologous.png"]
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        assert w > 4 * S and 3 * S < h < 4 * S
    gen = AnomalyGenerator(config(extended_anomalies=False), seen_anomalies(), "texture")
    assert len(show_anomalies(NORMALS, gen, tmp_path / "two", n=2)) == 2


def test_auto_strokes_draw_thin_simulated_anomalies_only_for_thin_seen_defects():
    cfg = config(strokes="auto", stroke_share=1.0, stroke_width=(1, 1), target_areas=False)
    thin = AnomalyGenerator(cfg, seen_anomalies(box=(30, 32, 10, 50), colour=(20, 20, 20), first=60), "texture")
    compact = AnomalyGenerator(cfg, seen_anomalies(), "texture")
    assert thin.strokes["used"] and thin.stroke_share == 1.0
    assert not compact.strokes["used"] and compact.stroke_share == 0.0
    for s in range(4):
        _, stroke = thin.simulated(NORMALS[s], rng(s))
        ys, xs = np.nonzero(stroke)
        assert stroke.sum() <= 3 * (max(np.ptp(ys), np.ptp(xs)) + 1)  # a line, a pixel or so wide
    # off by default; auto that decided off draws exactly what a generator without strokes draws
    plain = AnomalyGenerator(config(target_areas=False), seen_anomalies(), "texture")
    assert not plain.strokes["used"]
    assert all(np.array_equal(plain.simulated(NORMALS[s], rng(s))[0], compact.simulated(NORMALS[s], rng(s))[0])
               for s in range(3))


def test_a_fit_records_whether_it_drew_strokes(demo_root, tiny_config, tmp_path, capsys):
    from prn import api
    from prn.anomalies.simulated import stroke_decision
    from prn.checkpoint import load_checkpoint
    from prn.data.datasets import load_seen_arrays
    from prn.data.split import Split

    cfg = tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4, strokes="auto")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=True)
    payload = load_checkpoint(run)
    expected = stroke_decision("auto", load_seen_arrays(cfg, Split.load(run / "split.json")), cfg.synthesis.stroke_gate)
    assert payload["extra"]["strokes"] == expected
    assert [h for h in payload["history"] if h.get("event") == "strokes"]
    printed = capsys.readouterr()
    assert f"thin strokes among the simulated anomalies: {'on' if expected['used'] else 'off'}" in printed.out + printed.err


def test_small_seen_defects_counts_masks_under_the_pixel_floor_and_ignores_boxes_and_labels():
    from prn.data.datasets import small_seen_defects

    image = np.zeros((40, 40, 3), np.uint8)

    def mask(n):  # n pixels in one row
        m = np.zeros((40, 40), bool)
        m[5, :n] = True
        return m
    seen = [(image, mask(9), "mask"), (image, mask(15), "mask"), (image, mask(16), "mask"),
            (image, mask(2), "box"), (image, np.zeros((40, 40), bool), "label")]
    assert small_seen_defects(seen, 16) == {"masks": 3, "small": 2, "smallest": 9, "pixels": 16}
    assert small_seen_defects(seen[3:], 16) == {"masks": 0, "small": 0, "smallest": None, "pixels": 16}


@pytest.mark.parametrize("image_size", [32, 128])
def test_a_fit_says_when_seen_defects_are_under_one_cell_of_the_finest_map(demo_root, tiny_config, tmp_path, capsys,
                                                                           image_size):
    from prn import api
    from prn.checkpoint import load_checkpoint
    from prn.data.datasets import load_seen_arrays, small_seen_defects
    from prn.data.split import Split

    cfg = tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4, image_size=image_size)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=True)
    expected = small_seen_defects(load_seen_arrays(cfg, Split.load(run / "split.json")), 16)  # 4 x 4: Lite0's 1/4 map
    found = [h for h in load_checkpoint(run)["history"] if h.get("event") == "small seen defects"]
    assert found and {k: v for k, v in found[-1].items() if k != "event"} == expected
    printed = capsys.readouterr()
    note = (f"note: {expected['small']} of {expected['masks']} seen defects cover fewer than 16 pixels of the "
            f"{image_size} x {image_size} input (the smallest {expected['smallest']};")
    # the demo's defects are small at 32 pixels and not at 128: the note is printed for the first only
    assert expected["masks"] == 2 and (expected["small"] > 0) == (image_size == 32)
    assert (note in printed.out + printed.err) == (image_size == 32)
