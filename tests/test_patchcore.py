import math

import numpy as np
import pytest
import torch

from prn.baselines.patchcore import (
    PatchCore,
    greedy_coreset,
    image_scores,
    nearest_neighbors,
    random_projection,
)
from prn.model.backbone import create_encoder

SIZE = 64


def random_encoder(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_encoder("resnet18", weights="random")


def constant_images(levels, size=SIZE):
    """Flat grey images float (len(levels), 3, size, size)."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()


def with_square(images, top, left, side, colour=(0.9, 0.1, 0.2)):
    out = images.clone()
    out[:, :, top:top + side, left:left + side] = torch.tensor(colour).view(1, 3, 1, 1)
    return out


@pytest.fixture(scope="module")
def fitted():
    model = PatchCore(random_encoder(), image_size=SIZE, coreset_ratio=0.5)
    train = constant_images(np.linspace(0.4, 0.6, 8))
    return model.fit([train[:4], train[4:]])


def brute_force_k_center(points, n, start):
    """Gonzalez's greedy k-center from the full distance matrix, in float64 numpy."""
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    picked = [start]
    while len(picked) < n:
        picked.append(int(dist[:, picked].min(axis=1).argmax()))
    return picked


def test_greedy_coreset_matches_brute_force_k_center():
    points = np.random.default_rng(0).normal(size=(300, 6))
    got = greedy_coreset(torch.from_numpy(points).float(), 40, start=17)
    assert got.tolist() == brute_force_k_center(points, 40, start=17)


def test_greedy_coreset_never_repeats_a_point_even_among_duplicates():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(5, 1)
    got = greedy_coreset(points, 10, start=0)
    assert sorted(got.tolist()) == list(range(10))
    assert set(got[:2].tolist()) == {0, 1}


def test_random_projection_roughly_preserves_distances_and_is_seeded():
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(1))
    a = random_projection(x, 128, torch.Generator().manual_seed(5))
    b = random_projection(x, 128, torch.Generator().manual_seed(5))
    assert a.shape == (200, 128) and torch.equal(a, b)
    ratio = torch.pdist(a) / torch.pdist(x)
    # Johnson-Lindenstrauss at 128 dims: distortions of a few tens of percent at most.
    assert 0.95 < ratio.median() < 1.05 and 0.6 < ratio.min() and ratio.max() < 1.4


def test_a_patch_that_is_in_the_bank_is_at_distance_zero():
    # cdist's matrix-product form alone gives about 0.01 here (cancellation in |q|^2 - 2qm + |m|^2).
    bank = 2.0 * torch.randn(200, 384, generator=torch.Generator().manual_seed(0))
    dist, idx = nearest_neighbors(bank[[3, 50, 199]], bank, k=1)
    assert idx[:, 0].tolist() == [3, 50, 199]
    assert dist.abs().max().item() == 0.0


def test_image_score_follows_the_papers_reweighting_formula():
    rng = np.random.default_rng(2)
    patches, bank, b = rng.normal(size=(3, 20, 5)), rng.normal(size=(50, 5)), 9
    dist, score = image_scores(torch.from_numpy(patches), torch.from_numpy(bank), b)
    for i in range(3):
        d = np.linalg.norm(patches[i][:, None] - bank[None], axis=-1)  # (P, M)
        nearest = d.min(axis=1)
        worst = nearest.argmax()
        m_star = bank[d[worst].argmin()]
        support = np.argsort(np.linalg.norm(bank - m_star, axis=1))[:b]
        d_support = np.linalg.norm(bank[support] - patches[i][worst], axis=1)
        expected = (1 - math.exp(nearest[worst]) / np.exp(d_support).sum()) * nearest[worst]
        np.testing.assert_allclose(dist[i].numpy(), nearest, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(score[i].item(), expected, rtol=1e-5)


def test_patch_features_average_each_3x3_neighbourhood_of_the_encoder_taps():
    model = PatchCore(random_encoder(), image_size=SIZE)
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    f2 = model.encoder(images)[1][0].numpy()  # (128, 8, 8): the 1/8 tap
    patches = model.embed(images)
    assert patches.shape == (1, SIZE // 8, SIZE // 8, 128 + 256)
    np.testing.assert_allclose(patches[0, 4, 5, :128].numpy(), f2[:, 3:6, 4:7].mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(patches[0, 0, 0, :128].numpy(), f2[:, 0:2, 0:2].mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_fit_keeps_the_coreset_share_of_a_capped_bank():
    model = PatchCore(random_encoder(), image_size=SIZE, coreset_ratio=0.1, max_bank=300)
    model.fit([torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))])  # 512 patches
    assert model.memory_bank.shape == (30, 384)


def test_anomaly_map_peaks_inside_a_pasted_square(fitted):
    top, left, side = 12, 30, 20
    out = fitted.predict(with_square(constant_images([0.5]), top, left, side))
    amap = out["anomaly_map"]
    assert amap.shape == (1, 1, SIZE, SIZE) and amap.dtype == torch.float32
    row, col = divmod(int(amap.argmax()), SIZE)
    assert top <= row < top + side and left <= col < left + side


def test_anomalous_images_score_above_normal_ones(fitted):
    normal = constant_images([0.45, 0.5, 0.55])
    anomalous = with_square(normal, 20, 20, 16)
    scores_normal = fitted.predict(normal)["pred_score"]
    scores_anomalous = fitted.predict(anomalous)["pred_score"]
    assert scores_normal.shape == (3,)
    assert scores_normal.max() < scores_anomalous.min()


def test_state_dict_round_trip_gives_identical_outputs(fitted, tmp_path):
    torch.save(fitted.state_dict(), tmp_path / "patchcore.pt")
    fresh = PatchCore(random_encoder(seed=1), image_size=SIZE)
    assert fresh.memory_bank.shape[0] == 0
    fresh.load_state_dict(torch.load(tmp_path / "patchcore.pt", weights_only=True))
    images = with_square(constant_images([0.5, 0.52]), 5, 40, 12)
    a, b = fitted.predict(images), fresh.predict(images)
    assert torch.equal(a["anomaly_map"], b["anomaly_map"]) and torch.equal(a["pred_score"], b["pred_score"])


def test_predict_before_fit_raises():
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(random_encoder(), image_size=SIZE).predict(torch.rand(1, 3, SIZE, SIZE))


def test_images_of_another_size_are_refused(fitted):
    with pytest.raises(ValueError, match="64, 64"):
        fitted.predict(torch.rand(1, 3, 32, 32))
