import pytest

from cluster.config import ConfigError, load_config


def test_defaults_follow_avatar_md():
    cfg = load_config()
    assert cfg.learner.objective.clip_eps == 0.2 and cfg.learner.objective.kl_beta == 0.1
    assert cfg.learner.objective.tas_lambda == 0.3 and cfg.learner.objective.tas_shape == "parabola"
    assert cfg.buffer.capacity == 10_000 and cfg.buffer.tier_ratios == {"easy": 0.25, "medium": 0.35, "hard": 0.40}
    assert cfg.processor.max_frames == 16 and cfg.processor.max_pixels == 224 * 224


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: trial\nlearner:\n  lr: 1.0e-6\n  zero_stage: 1\n")
    cfg = load_config(path, ["learner.lr=2e-6", "rollout.group_size=8", "pipeline.max_staleness=2", "stage=3"])
    assert cfg.name == "trial"
    assert cfg.learner.lr == pytest.approx(2e-6) and cfg.learner.zero_stage == 1
    assert cfg.rollout.group_size == 8 and cfg.pipeline.max_staleness == 2 and cfg.stage == 3


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.objective.clip_epsilon=0.3"])
    text = str(err.value)
    assert "learner.objective.clip_epsilon: unknown key" in text
    assert "clip_eps" in text and "tas_shape" in text


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.objective.tas_shape=cosine"])
    text = str(err.value)
    assert "learner.objective.tas_shape" in text
    assert "'parabola'" in text and "'inverse_parabola'" in text and "'cosine'" in text


def test_bad_number_and_cross_field_checks():
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(None, ["rollout.group_size=0"])
    with pytest.raises(ConfigError, match="tier_ratios"):
        load_config(None, ["buffer.tier_ratios={easy: 0.5, medium: 0.5, hard: 0.5}"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
