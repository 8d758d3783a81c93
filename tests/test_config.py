"""Run configs: every bad value is one ConfigError line naming the file or flag and the key."""

from __future__ import annotations

import pytest
import torch
import yaml

from raytumor.config import RunConfig, load_config
from raytumor.errors import ConfigError
from raytumor.models import build_model
from raytumor.train.run_dir import check_run
from tests.conftest import make_dataset


def _keys_with_defaults_of(kind: type) -> list[str]:
    return [f"{section}.{key}" for section, value in RunConfig().model_dump().items() if isinstance(value, dict)
            for key, default in value.items() if type(default) is kind]


FLOAT_KEYS = _keys_with_defaults_of(float)
INT_KEYS = _keys_with_defaults_of(int) + ["seed"]


def config_error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path, list(overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_every_float_is_finite(key, value):
    # lr=inf passed validation, and training failed inside Ray ("reference embeddings contain NaN").
    assert f"{key}: Input should be a finite number" in config_error(f"{key}={value}")


def test_the_float_keys_are_all_found():
    assert {"model.width", "train.lr", "train.margin", "pretrain.temperature", "resources.cpus_per_worker"} <= set(FLOAT_KEYS)
    assert {"train.epochs", "data.augment_n", "resources.num_workers"} <= set(INT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_is_not_a_number(key, value):
    # train.margin=true silently became 1.0.
    assert f"{key}: must be a number, not a boolean" in config_error(f"{key}={value}")


def test_a_boolean_is_not_an_axis_length():
    assert "data.shape.0: must be a number, not a boolean" in config_error("data.shape=[true, 8, 4]")


def test_numbers_still_load():
    config = load_config(overrides=["train.lr=1e-4", "train.margin=1", "train.epochs=3", "data.shape=[8, 8, 4]"])
    assert config.train.lr == 1e-4 and config.train.margin == 1.0 and config.train.epochs == 3


def test_a_batch_holds_two_classes_of_samples_per_class_rows():
    # batch_size=4 with K=3 trained on batches of 6 rows without a word.
    assert config_error("train.batch_size=4").endswith(
        "train.samples_per_class: must be at most half of train.batch_size (4): a batch holds K rows of each of at "
        "least 2 classes (got 3)")
    assert "train.samples_per_class: must be at most half" in config_error("train.samples_per_class=16")
    config = load_config(overrides=["train.batch_size=6", "train.samples_per_class=3"])
    assert (config.train.batch_size, config.train.samples_per_class) == (6, 3)


@pytest.mark.parametrize("name", ["../../escape", "/tmp/x/absrun", "", ".", "..", "a/b", "a\\b", "runs/"])
def test_a_run_name_is_one_directory_name(name):
    message = config_error(f"name={yaml.safe_dump(name).splitlines()[0]}")
    assert message.startswith("defaults + --set: name: must be one directory name")


def test_a_run_name_may_hold_dots_and_dashes():
    assert load_config(overrides=["name=tiny-v1.2"]).name == "tiny-v1.2"


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x80bad")
    assert config_error(path=path) == f"{path}: not a UTF-8 text file (byte 0xff at offset 0)"


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 2\n  epochs: 5\n")
    assert config_error(path=path) == f"{path}: duplicate key 'epochs' (line 3)"
    assert config_error("train={epochs: 2, epochs: 5}") == "--set train={epochs: 2, epochs: 5}: duplicate key 'epochs' (line 1)"


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("pretrain:\n  <<: {epochs: 2, lr: 0.01}\n  epochs: 5\n")
    config = load_config(path)
    assert config.pretrain.epochs == 5 and config.pretrain.lr == 0.01


@pytest.mark.parametrize("item", ["=3", " =3", "train..lr=3", "train.=3", ".lr=3", "train.lr"])
def test_an_override_without_a_key_names_it_once(item):
    assert config_error(item) == f"--set {item}: expected key=value with a config key, e.g. train.margin=0.5"


@pytest.fixture
def run_overrides(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3, 3), shape=(8, 8, 4))
    return [f"data.dataset={dataset}", f"output_dir={tmp_path / 'runs'}", "name=r", "model.width=0.0625"]


def pretrained_check_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        check_run(load_config(overrides=overrides), resume=False)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_backbone_of_the_runs_encoder_and_width_passes(tmp_path, run_overrides):
    backbone = tmp_path / "pretrain_backbone.pt"
    torch.save(build_model("paper_cnn", width=0.0625).backbone.state_dict(), backbone)
    check_run(load_config(overrides=[*run_overrides, f"train.pretrained={tmp_path}"]), resume=False)


def test_a_backbone_of_another_width_fails_before_ray(tmp_path, run_overrides):
    backbone = tmp_path / "pretrain_backbone.pt"
    torch.save(build_model("paper_cnn", width=0.125).backbone.state_dict(), backbone)
    message = pretrained_check_error([*run_overrides, f"train.pretrained={backbone}"])
    assert message.startswith(f"train.pretrained: {backbone}: backbone weights do not fit this model")
    assert "shape mismatches" in message and message.endswith("this run has model.encoder 'paper_cnn', model.width 0.0625")
    assert not (tmp_path / "runs").exists()


def test_a_damaged_backbone_fails_before_ray(tmp_path, run_overrides):
    whole = tmp_path / "whole.pt"
    torch.save(build_model("paper_cnn", width=0.0625).backbone.state_dict(), whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:2000])
    message = pretrained_check_error([*run_overrides, f"train.pretrained={truncated}"])
    assert message.startswith(f"train.pretrained: {truncated}: not a loadable weights file (")


def test_a_backbone_file_without_a_state_dict_fails_before_ray(tmp_path, run_overrides):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    message = pretrained_check_error([*run_overrides, f"train.pretrained={tensor}"])
    assert message == f"train.pretrained: {tensor}: expected a state dict of weights, got a Tensor"
