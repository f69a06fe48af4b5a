from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, flatten, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["model.kernel=exponential", "train.steps=7", "data.synthetic.range_km=3.5"]
    )
    assert cfg.model.kernel == "exponential"
    assert cfg.train.steps == 7
    assert cfg.data.synthetic.range_km == 3.5
    assert flatten(cfg)["model.kernel"] == "exponential"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(
        ConfigError, match=r"unknown key 'model\.kernal'.*did you mean 'model\.kernel'"
    ):
        load_config(None, ["model.kernal=matern32"])


def test_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  heads: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'modle'.*did you mean 'model'"):
        load_config(path)


def test_bad_value_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.kernel=matern99"])
    text = str(err.value)
    assert "model.kernel" in text and "'matern99'" in text and "matern32" in text


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.d_model=30", "model.heads=4"])
    with pytest.raises(ConfigError, match="test split"):
        load_config(None, ["data.train_fraction=0.8", "data.val_fraction=0.2"])
    with pytest.raises(ConfigError, match="spherical"):
        load_config(None, ["data.synthetic.family=spherical"])


def test_negative_value_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.steps = -1"):
        load_config(None, ["train.steps=-1"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.kernel"])


@pytest.mark.parametrize("name", ["../victim", "a/b", ".hidden", "", "x\\y"])
def test_run_name_cannot_leave_the_output_folder(name):
    with pytest.raises(ConfigError, match="name"):
        load_config(None, [f"name={name}"])
