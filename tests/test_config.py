"""Experiment files: parsing, overrides, errors that name the key and the file, the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from querytune.config import ConfigError, load_config

from .conftest import REPO

BASE = "dataset_name: some/data\nlabel_column: intent\n"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_values_are_typed_and_cli_overrides_win(tmp_path):
    path = write(
        tmp_path, BASE + "method: lora\nlora_r: 4\nlearning_rate: 1.0e-3\nlora_target_modules: [query, value]\n"
    )
    config = load_config(path, ["--learning_rate", "3e-4", "--lora_r=16"])
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.method.lora_r == 16
    assert config.method.lora_target_modules == ["query", "value"]
    assert config.training.output_dir == "runs/exp"  # default: named after the experiment
    assert config.training.label_names == ["labels"]


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (
            BASE + "lerning_rate: 0.1\n",
            [],
            r"exp\.yaml: unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)",
        ),
        (BASE, ["--lora_rank", "4"], r"command line: unknown key 'lora_rank'"),
        (BASE + "num_train_epochs: many\n", [], r"exp\.yaml: bad value for key 'num_train_epochs'.*many"),
        (BASE, ["--learning_rate", "fast"], r"command line: bad value for key 'learning_rate'"),
        (BASE + "method: lora\nlora_r: [1, 2]\n", [], r"exp\.yaml: bad value for key 'lora_r'"),
        (BASE + "method: magic\n", [], r"exp\.yaml: method must be one of"),
        (BASE + "method: prefix\nlora_r: 8\n", [], r"lora_r is set but method is 'prefix'"),
        (BASE + "task: translation\n", [], r"task must be one of"),
        ("label_column: intent\n", [], r"set dataset_name or train_file"),
        (BASE + "early_stopping_patience: 2\n", [], r"needs load_best_model_at_end"),
        (BASE + "method: lora\n  lora_r: 4\n", [], r"exp\.yaml: YAML syntax error at line 4"),
        ("- just\n- a list\n", [], r"must be a mapping"),
    ],
)
def test_bad_experiments_fail_naming_key_and_source(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), overrides)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "nope.yaml")


def test_base_inheritance_and_cycles(tmp_path):
    write(tmp_path, BASE + "learning_rate: 1.0e-4\nnum_train_epochs: 7\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nmethod: lora\nlearning_rate: 2.0e-3\n", "child.yaml")
    config = load_config(child)
    assert config.training.num_train_epochs == 7 and config.training.learning_rate == pytest.approx(2e-3)
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, BASE + "method: adalora\nadalora_init_r: 6\nhub_token: secret\n"))
    config.save(tmp_path / "resolved.yaml")
    text = (tmp_path / "resolved.yaml").read_text()
    assert "secret" not in text and "hub_token" not in text
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_flat_dict() == config.to_flat_dict()


def test_null_means_none_in_yaml_and_on_the_command_line(tmp_path):
    path = write(tmp_path, BASE + "test_split: null\nrename_columns: [content=text]\n")
    assert load_config(path).data.test_split is None
    assert load_config(path, ["--test_split", "test"]).data.test_split == "test"
    assert load_config(write(tmp_path, BASE, "b.yaml"), ["--test_split", "null"]).data.test_split is None
    with pytest.raises(ConfigError, match="'text_column' cannot be null"):
        load_config(path, ["--text_column=null"])
    with pytest.raises(ConfigError, match="rename_columns takes OLD=NEW"):
        load_config(path, ["--rename_columns", "content"])


RUNNABLE = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p.parent.name != "methods")


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_every_experiment_file_parses(path):
    config = load_config(path)
    assert config.method.method
    assert Path(config.training.output_dir).name  # every experiment names its run directory
