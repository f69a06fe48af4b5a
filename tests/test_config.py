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
    with pytest.raises(ConfigError, match="kernel_heads=5 is more than heads=4"):
        load_config(None, ["model.heads=4", "model.kernel_heads=5"])
    with pytest.raises(ConfigError, match="train.ema_decay averages the whole parameters"):
        load_config(None, ["train.ema_decay=0.99", "train.zero_stage=3"])


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


@pytest.mark.parametrize(
    "text, where",
    [
        ("data:\n\tstore: x\n", ":2:1: found character '\\t'"),  # a tab indent
        ("train:\n  steps: [1, 2\n", ":3:1: expected ','"),
        ("model:\n  kernel: matern32\n   heads: 4\n", ":3:"),
    ],
)
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}{where}"), str(err.value)
    assert "\n" not in str(err.value)


def test_non_utf8_yaml_and_a_directory_are_clear_errors(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  steps: 3\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}:3: byte 0xe9 is not UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["tune:", "  space:", "    a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):  # 10^9 values once expanded
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_config(path)
    anchors = tmp_path / "anchors.yaml"  # an ordinary use of anchors still loads
    anchors.write_text("model: &m {kernel: matern52}\ntune:\n  space: {}\n")
    assert load_config(anchors).model.kernel == "matern52"


def test_dates_stay_the_strings_they_are_written_as(tmp_path):
    path = tmp_path / "start.yaml"
    path.write_text("data:\n  source:\n    start: 2024-01-01\n    freq: h\n")
    assert load_config(path).data.source.start == "2024-01-01"
    assert load_config(None, ["data.source.start=2024-01-01"]).data.source.start == "2024-01-01"


def test_a_check_across_a_section_names_the_key_not_the_whole_section():
    with pytest.raises(ConfigError) as err:
        load_config(
            Path(__file__).parents[1] / "configs/los_loop.yaml", ["data.holdout_sensors=1.5"]
        )
    message = str(err.value)
    assert "holdout_sensors = 1.5: give a fraction in (0, 1) or sensor ids" in message
    assert "los_speed.csv" not in message and "'store'" not in message
