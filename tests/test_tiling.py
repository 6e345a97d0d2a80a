"""Tiles (``model.tiles``): the resized image cut into a grid the network sees one tile at a time,
trained on the grid's tiles, with maps put back together; every caller gives the same answer."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from prn.anomalies.compose import AnomalyGenerator, TrainingSet
from prn.config import PRNConfig
from prn.data.sample import Sample
from prn.deploy.predict import Predictor, predict_folder
from prn.infer import predict_samples
from prn.runs import resolve_input_size
from prn.tiling import from_tiles, tile_at, tile_of_pixel, to_tiles

TOL = 1e-5


def test_tiles_are_cut_row_major_per_image_and_put_back_exactly():
    x = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).reshape(2, 3, 6, 9)
    tiles = to_tiles(x, 3)
    assert tiles.shape == (18, 3, 2, 3)
    assert torch.equal(tiles[1], x[0, :, 0:2, 3:6])       # image 0, row 0, column 1
    assert torch.equal(tiles[9 + 5], x[1, :, 2:4, 6:9])   # image 1, row 1, column 2
    assert torch.equal(from_tiles(tiles, 3), x)
    assert to_tiles(x, 1) is x
    with pytest.raises(ValueError, match="equal tiles"):
        to_tiles(x, 4)
    array = x[0].permute(1, 2, 0).numpy()
    assert np.array_equal(tile_at(array, 3, 2, 1), array[4:6, 3:6])
    assert tile_of_pixel((6, 9), 3, 5, 3) == (2, 1)


def test_the_size_must_cut_into_tiles_of_multiples_of_32_and_the_head_needs_one_tile():
    assert PRNConfig(image_size=192, tiles=3).model.tile_hw == (64, 64)
    with pytest.raises(ValueError, match="multiple of 96"):
        PRNConfig(image_size=128, tiles=3)
    with pytest.raises(ValueError, match="image_hw"):
        PRNConfig(image_size=192, tiles=3, image_hw=(96, 160))
    with pytest.raises(ValueError, match="tiles must be"):
        PRNConfig(tiles=0)
    with pytest.raises(ValueError, match="whole image"):
        PRNConfig(image_size=192, tiles=3, image_score="head")


def test_keep_aspect_rounds_the_short_side_to_whole_tiles(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((460, 1130, 3), np.uint8)).save(path)
    split = type("S", (), {"train_normal": [Sample(path, None, 0, "good")]})()
    cfg = resolve_input_size(PRNConfig(image_size=1152, tiles=3, keep_aspect=True), split)
    assert cfg.model.input_hw == (480, 1152) and cfg.model.tile_hw == (160, 384)


def test_training_items_are_tiles_of_the_grid_and_a_seen_tile_holds_its_defect(tiny_config, demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, image_size=128, tiles=2)
    rng = np.random.default_rng(0)
    normals = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    seen_mask = np.zeros((128, 128), bool)
    seen_mask[100:104, 20:26] = True  # in tile (1, 0) alone
    seen = [(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), seen_mask, "mask")]
    data = TrainingSet(normals, AnomalyGenerator(cfg, seen, "texture"), cfg)
    grid = [tile_at(normals[1], 2, r, c) for r in range(2) for c in range(2)]
    picked = set()
    for seed in range(12):
        item = data[("normal", 1, seed)]
        assert item["image"].shape == (3, 64, 64) and not item["mask"].any()
        image = np.rint(item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        picked.update(i for i, tile in enumerate(grid) if np.array_equal(image, tile))
    assert len(picked) > 1  # the seed draws the tile; each item is exactly one of the grid's
    for seed in range(6):
        item = data[("seen", 0, seed)]
        assert item["image"].shape == (3, 64, 64) and item["mask"].any() and item["kind"] == "seen"
        item = data[("extended", 0, seed)]
        assert item["image"].shape == (3, 64, 64) and item["mask"].any()


def test_a_tiled_map_is_each_tile_alone_put_back_and_prototypes_count_images(tiled_run, demo_root):
    predictor = Predictor(tiled_run, device="cpu")
    model, cfg = predictor.model, predictor.cfg
    split = __import__("json").loads((tiled_run / "split.json").read_text())
    k = math.ceil(cfg.model.prototype_ratio * len(split["train_normal"]))
    assert all(getattr(model.prototypes, n).shape[0] == k for n in model.prototypes.names)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        whole = model.eval()(x)
        model.cfg.tiles = 1  # the same network, fed one tile at a time
        try:
            alone = [model(to_tiles(x, 2)[i:i + 1])["anomaly_map"] for i in range(8)]
        finally:
            model.cfg.tiles = 2
    stitched = from_tiles(torch.cat(alone), 2)
    assert whole["anomaly_map"].shape == (2, 1, 128, 128)
    torch.testing.assert_close(whole["anomaly_map"], stitched, rtol=0, atol=TOL)
    top = stitched.flatten(1).topk(cfg.model.top_k, dim=1).values.mean(1)
    torch.testing.assert_close(whole["pred_score"], top, rtol=0, atol=TOL)


def test_predict_test_and_the_exported_graph_agree_on_a_tiled_run(tiled_run, demo_root, tmp_path, request):
    frames = sorted((demo_root / "demo" / "test").rglob("*.png"))[:3]
    assert len(frames) == 3
    predictor = Predictor(tiled_run, device="cpu")
    test = predict_samples(predictor.model, [Sample(p, None, 0, "good") for p in frames],
                           predictor.cfg.model.input_hw, device="cpu")
    folder = tmp_path / "in"
    folder.mkdir()
    for p in frames:
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    predict_folder(predictor, folder, tmp_path / "out", maps="npy", progress=False)
    rows = {r["path"]: float(r["score"]) for r in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    for i, p in enumerate(frames):
        assert abs(rows[f"{p.parent.name}_{p.name}"] - test.scores[i]) <= TOL
    # the export last, asked for here: without onnxruntime its fixture skips, after the torch checks
    path = request.getfixturevalue("tiled_run_onnx")
    from prn.deploy.export import read_metadata, run_exported
    assert read_metadata(path)["tiles"] == "2"
    for i, p in enumerate(frames):
        got = run_exported(path, np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)[None].copy())
        assert abs(float(got["score"][0]) - test.scores[i]) <= TOL
        np.testing.assert_allclose(got["anomaly_map"][0, 0], test.maps[i], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["patchcore", "prototypes"])
def test_the_baselines_refuse_tiles_rather_than_ignore_them(kind):
    from prn import registry
    from prn.errors import PRNError
    with pytest.raises(PRNError, match="tiles are PRN's"):
        registry.build(kind, PRNConfig(image_size=128, tiles=2, backbone_weights="random"))
