import pytest

from prn.config import PRNConfig


def test_defaults_are_the_papers():
    cfg = PRNConfig()
    assert cfg.model.image_size == 256
    assert cfg.model.prototype_ratio == 0.1 and cfg.model.kmeans_max_iter == 300
    assert cfg.model.attention_layers == 3 and cfg.model.attention_patch_divisors == (1, 2, 4, 8)
    assert (cfg.training.lr, cfg.training.weight_decay) == (1e-4, 1e-2)
    assert (cfg.training.focal_alpha, cfg.training.focal_gamma, cfg.training.focal_weight) == (0.5, 4.0, 5.0)
    assert cfg.training.epochs == 700 and cfg.training.batch_size == 64 and cfg.training.batch_composition == (32, 16, 16)
    assert cfg.model.top_k == 100 and cfg.data.seen_anomalies == 10


def test_batch_composition_keeps_two_to_one_to_one():
    assert PRNConfig(batch_size=16).training.batch_composition == (8, 4, 4)
    assert PRNConfig(batch_size=4).training.batch_composition == (2, 1, 1)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = PRNConfig(dataset="btad", category="01", use_attention=False, decoder_channels=(8, 8, 8, 8))
    cfg.save(tmp_path / "c.yaml")
    assert PRNConfig.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("change, words", [
    (dict(dataset="coco"), "dataset"), (dict(image_size=100), "image_size"),
    (dict(batch_size=6), "batch_size"), (dict(beta_max=1.0), "beta"),
    (dict(prototype_ratio=0), "prototype_ratio"), (dict(seen_anomalies=-1), "seen_anomalies"),
    (dict(added_seen_share=1.0), "added_seen_share"),
])
def test_invalid_settings_are_refused_with_the_field_named(change, words):
    with pytest.raises(ValueError, match=words):
        PRNConfig(**change)


def test_unknown_keys_in_a_config_file_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nepocs: 4\n")
    with pytest.raises(ValueError, match="epocs"):
        PRNConfig.load(tmp_path / "c.yaml")


def test_mvtec_object_categories_get_object_target_areas():
    assert PRNConfig(dataset="mvtec", category="bottle").data.resolved_category_kind == "object"
    assert PRNConfig(dataset="mvtec", category="carpet").data.resolved_category_kind == "texture"
    assert PRNConfig(dataset="dagm", category="Class1").data.resolved_category_kind == "texture"
    assert PRNConfig(dataset="dagm", category_kind="object").data.resolved_category_kind == "object"
