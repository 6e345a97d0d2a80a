"""Prototypes and residuals (Sec. 3.1) against brute force and hand-made clusters."""

import itertools

import numpy as np
import pytest
import torch

from prn.model.prototypes import Prototypes, kmeans_prototypes, nearest_per_position, nearest_prototype, num_prototypes


def brute_force_nearest(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    out = []
    for f in feats.double():
        dists = [torch.sqrt(((f - p.double()) ** 2).sum()).item() for p in protos]
        out.append(int(np.argmin(dists)))
    return torch.tensor(out)


@pytest.mark.parametrize("n, ratio, k", [(30, 0.1, 3), (31, 0.1, 4), (5, 0.1, 1), (300, 0.05, 15),
                                         (10, 0.25, 3), (7, 1.0, 7), (3, 0.7, 3)])
def test_num_prototypes_is_ceil_of_ratio_times_count(n, ratio, k):
    assert num_prototypes(n, ratio) == k


def test_kmeans_centres_are_the_means_of_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([-20.0, 0.0, 20.0])
    labels = torch.arange(12) % 3
    feats = offsets[labels].view(12, 1, 1, 1) + 0.1 * torch.randn(12, 4, 2, 2, generator=g)
    centres = kmeans_prototypes(feats, 3, max_iter=50, seed=0)
    assert centres.shape == (3, 4, 2, 2)
    expected = torch.stack([feats[labels == i].mean(0) for i in range(3)])
    order = centres.mean(dim=(1, 2, 3)).argsort()  # k-means numbers its clusters arbitrarily
    torch.testing.assert_close(centres[order], expected, atol=1e-5, rtol=0)


def test_kmeans_returns_k_maps_of_the_input_shape():
    feats = torch.rand(20, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert kmeans_prototypes(feats, 5, max_iter=20, seed=3).shape == (5, 3, 4, 4)


def test_kmeans_with_k_equal_to_count_keeps_every_map():
    feats = torch.rand(6, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kmeans_prototypes(feats, num_prototypes(6, 1.0)), feats, atol=0, rtol=0)


def test_nearest_prototype_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    feats, protos = torch.randn(9, 3, 4, 4, generator=g), torch.randn(7, 3, 4, 4, generator=g)
    assert torch.equal(nearest_prototype(feats, protos), brute_force_nearest(feats, protos))


def test_nearest_prototype_matches_brute_force_when_maps_are_nearly_equal():
    # Large common offset, tiny differences: ||a||^2 - 2ab + ||b||^2 in float32 cannot tell them apart.
    g = torch.Generator().manual_seed(4)
    base = 300.0 + torch.randn(1, 8, 16, 16, generator=g)
    protos = base + 1e-3 * torch.randn(6, 8, 16, 16, generator=g)
    feats = base + 1e-3 * torch.randn(10, 8, 16, 16, generator=g)
    expected = brute_force_nearest(feats, protos)
    assert len(set(expected.tolist())) > 1
    assert torch.equal(nearest_prototype(feats, protos), expected)


def float32_expansion_about_the_origin(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    a, b = feats.flatten(1), protos.flatten(1)
    return (b.square().sum(1)[None] - 2 * a @ b.T).argmin(1)


@pytest.mark.parametrize("offset", [300.0, 3000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_prototype_in_float32_keeps_the_float64_argmin_of_close_maps(offset, seed):
    # float32 throughout (export-clean), yet the argmin of float64 brute force on maps that a
    # float32 expansion about the origin gets wrong.
    g = torch.Generator().manual_seed(seed)
    spread = 1e-3 * offset / 300.0
    base = offset + torch.randn(1, 8, 16, 16, generator=g)
    protos = base + spread * torch.randn(6, 8, 16, 16, generator=g)
    feats = base + spread * torch.randn(10, 8, 16, 16, generator=g)
    expected = brute_force_nearest(feats, protos)
    assert len(set(expected.tolist())) > 1
    assert not torch.equal(float32_expansion_about_the_origin(feats, protos), expected)
    assert torch.equal(nearest_prototype(feats, protos), expected)


def test_nearest_prototype_keeps_the_float64_argmin_of_maps_far_from_every_prototype():
    g = torch.Generator().manual_seed(8)
    base = 300.0 + torch.randn(1, 8, 16, 16, generator=g)
    protos = base + 1e-3 * torch.randn(6, 8, 16, 16, generator=g)
    feats = base + 5.0 * torch.randn(10, 8, 16, 16, generator=g)
    expected = brute_force_nearest(feats, protos)
    assert len(set(expected.tolist())) > 2
    assert torch.equal(nearest_prototype(feats, protos), expected)


def test_residual_is_absolute_difference_to_the_nearest_prototype_at_each_scale():
    g = torch.Generator().manual_seed(5)
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    protos = [torch.randn(5, *s, generator=g) for s in shapes]
    feats = [torch.randn(3, *s, generator=g) for s in shapes]
    module = Prototypes()
    module.set(protos)
    res, indices = module.residuals_and_indices(feats)
    for f, p, d, idx in zip(feats, protos, res, indices):
        nearest = brute_force_nearest(f, p)
        assert torch.equal(idx, nearest)
        for b in range(3):
            torch.testing.assert_close(d[b], (f[b] - p[nearest[b]]).abs(), atol=0, rtol=0)


def brute_force_per_position(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(B, h, w): the index of the prototype whose vector at each position is nearest, in float64."""
    d = (feats.double()[:, None] - protos.double()[None]).square().sum(dim=2)  # (B, K, h, w)
    return d.argmin(dim=1)


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (300.0, 1e-3)])
def test_position_match_takes_each_positions_nearest_prototype_vector(offset, spread):
    # the large common offset with tiny differences is the case float32 loses about the origin
    g = torch.Generator().manual_seed(9)
    base = offset + torch.randn(1, 6, 5, 7, generator=g)
    protos = base + spread * torch.randn(4, 6, 5, 7, generator=g)
    feats = base + spread * torch.randn(3, 6, 5, 7, generator=g)
    expected = brute_force_per_position(feats, protos)
    matched, index = nearest_per_position(feats, protos)
    assert len(set(expected.flatten().tolist())) == 4
    assert torch.equal(index, expected)
    for b, y, x in itertools.product(range(3), range(5), range(7)):
        assert torch.equal(matched[b, :, y, x], protos[expected[b, y, x], :, y, x])


def test_position_residuals_are_never_larger_than_the_whole_maps_at_any_position():
    g = torch.Generator().manual_seed(10)
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    protos = [torch.randn(5, *s, generator=g) for s in shapes]
    feats = [torch.randn(3, *s, generator=g) for s in shapes]
    whole, local = Prototypes(), Prototypes(match="position")
    whole.set(protos)
    local.set(protos)
    res_map = whole.residuals(feats)
    res_pos, idx_pos = local.residuals_and_indices(feats)
    for f, a, b, i in zip(feats, res_map, res_pos, idx_pos):
        assert i.shape == (3, *f.shape[-2:])
        norm_map, norm_pos = a.square().sum(dim=1), b.square().sum(dim=1)
        assert (norm_pos <= norm_map + 1e-5).all()
        assert (norm_pos < norm_map - 1e-3).any()  # random maps: some position has a nearer vector
    # one prototype: both matches are the same
    single = [p[:1] for p in protos]
    whole.set(single)
    local.set(single)
    assert all(torch.equal(a, b) for a, b in zip(whole.residuals(feats), local.residuals(feats)))


@pytest.mark.parametrize("match", ["map", "position"])
def test_what_the_match_prepares_is_made_on_set_and_on_load_and_never_saved(match):
    g = torch.Generator().manual_seed(11)
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    fitted = Prototypes(match=match)
    fitted.set([torch.randn(5, *s, generator=g) for s in shapes])
    assert set(fitted.state_dict()) == {"p1", "p2", "p3"}  # checkpoints hold the prototypes alone
    fresh = Prototypes(match=match)
    fresh.load_state_dict(fitted.state_dict())
    feats = [torch.randn(2, *s, generator=g) for s in shapes]
    # the same figures as the match made from the prototypes on the spot
    nearest = nearest_per_position if match == "position" else nearest_prototype
    for name, f, got in zip(fresh.names, feats, fresh.residuals_and_indices(feats)[1]):
        want = nearest(f, getattr(fitted, name))
        assert torch.equal(got, want[1] if match == "position" else want)
        assert all(torch.equal(a, b) for a, b in zip(fresh.prepared(name), fitted.prepared(name)))
    fresh.set([torch.randn(3, *s, generator=g) for s in shapes])  # set again: prepared anew
    assert fresh.prepared("p1")[1].shape[-1 if match == "position" else 0] == 3


def test_a_traced_graph_makes_what_the_match_needs_from_the_prototypes_instead_of_storing_it():
    module = Prototypes(num_scales=1, match="position")
    module.set([torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(12))])
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, f):
            seen.append(module.prepared("p1"))
            return module.residuals([f])[0]

    f = torch.randn(2, 2, 4, 4)
    traced = torch.jit.trace(Probe(), f, check_trace=False)
    assert seen == [None] and module.prepared("p1") is not None
    assert torch.equal(traced(f), module.residuals([f])[0])


def test_unknown_prototype_match_is_refused():
    from prn.config import PRNConfig

    with pytest.raises(ValueError, match="match must be one of map, position"):
        Prototypes(match="pixel")
    with pytest.raises(ValueError, match="invalid PRN config: prototype_match must be one of map, position"):
        PRNConfig(prototype_match="patch")


def test_scales_choose_their_nearest_prototype_independently():
    # Feature 0 sits on prototype 0 at scale 1 but on prototype 1 at scale 2.
    p1 = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    p2 = torch.stack([torch.zeros(1, 1, 1), torch.ones(1, 1, 1)])
    module = Prototypes(num_scales=2)
    module.set([p1, p2])
    _, indices = module.residuals_and_indices([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 1, 1)])
    assert [i.tolist() for i in indices] == [[0], [1]]


def test_state_dict_with_another_k_loads_into_a_fresh_module():
    g = torch.Generator().manual_seed(6)
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    fitted = Prototypes()
    fitted.set([torch.randn(k, *s, generator=g) for k, s in zip((7, 7, 7), shapes)])
    other = Prototypes()
    other.set([torch.randn(2, *s, generator=g) for s in shapes])
    fresh = Prototypes()
    for target in (other, fresh):
        target.load_state_dict(fitted.state_dict())
        feats = [torch.randn(2, *s, generator=g) for s in shapes]
        for a, b in zip(fitted.residuals(feats), target.residuals(feats)):
            assert torch.equal(a, b)
        assert target.p1.shape == (7, 4, 8, 8)


def test_residuals_before_fitting_raise():
    with pytest.raises(RuntimeError, match="fit_prototypes"):
        Prototypes().residuals([torch.zeros(1, 1, 2, 2)] * 3)


def test_residuals_of_maps_of_another_size_raise():
    module = Prototypes()
    module.set([torch.zeros(1, 1, s, s) for s in (8, 4, 2)])
    with pytest.raises(ValueError, match="image size"):
        module.residuals([torch.zeros(1, 1, s, s) for s in (16, 8, 4)])


@pytest.mark.parametrize("k, seed", list(itertools.product([2, 4], [0, 1])))
def test_kmeans_is_reproducible_for_a_seed(k, seed):
    feats = torch.rand(12, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(kmeans_prototypes(feats, k, seed=seed), kmeans_prototypes(feats, k, seed=seed))


def test_fitting_over_batches_gives_the_prototypes_of_all_their_maps_clustered_at_once():
    """fit_prototypes keeps the features as flat arrays, scale by scale, and lets k-means centre
    them in place: the centres must be those of k-means on the concatenated maps."""
    from prn.model.prototypes import fit_prototypes

    class Encoder(torch.nn.Module):  # three fixed "scales" of a batch: deterministic features
        def forward(self, x):
            return [x.repeat(1, 2, 1, 1), x[..., ::2, ::2], x[..., ::4, ::4] * 3]

    batches = [torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    module = Prototypes()
    fit_prototypes(Encoder(), module, batches, ratio=0.25, max_iter=30, seed=2)
    feats = [torch.cat(s) for s in zip(*(Encoder()(b) for b in batches))]
    for name, f in zip(module.names, feats):
        assert torch.equal(getattr(module, name), kmeans_prototypes(f, 3, max_iter=30, seed=2))
    whole = Prototypes()
    fit_prototypes(Encoder(), whole, batches, ratio=1.0)  # K = N: every map is a prototype
    assert torch.equal(whole.p2, feats[1])
