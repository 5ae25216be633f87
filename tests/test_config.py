"""Experiment files: parsing, overrides, errors that name the key and the file, the resolved config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from querytune.config import ConfigError, load_config
from querytune.methods import get_method, method_names
from querytune.methods.registry import options_of_other_methods

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


# --- switching method from the command line (a sweep passes flags the same way)
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
QUICKSTART_LORA = ("lora_r", "lora_alpha", "lora_target_modules")  # what the quickstart sets for its LoRA


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("form", ["--method X", "--method=X"])
def test_method_on_the_command_line_drops_the_files_options_of_another_method(method, form, caplog):
    """`--method X` over the quickstart (a LoRA file) parses for every method: the file's LoRA options that X does not
    own are dropped with one notice naming them; those X owns (AdaLoRA's lora_*) are kept."""
    flags = ["--method", method] if form == "--method X" else [f"--method={method}"]
    with caplog.at_level(logging.WARNING, logger="querytune.config"):
        config = load_config(QUICKSTART, flags)
    assert config.method.method == method
    assert options_of_other_methods(config.method) == []
    owned = set(get_method(method).options)
    dropped = [k for k in QUICKSTART_LORA if k not in owned]
    notices = [r.getMessage() for r in caplog.records if "--method" in r.getMessage()]
    if dropped:
        assert len(notices) == 1 and "\n" not in notices[0], notices
        assert notices[0].endswith(": " + ", ".join(dropped)) and str(QUICKSTART) in notices[0]
        assert all(getattr(config.method, k) is None for k in dropped)
    else:
        assert notices == []
        assert config.method.lora_r == 8 and config.method.lora_target_modules == ["query", "key", "value", "dense"]


def test_an_option_of_another_method_on_the_command_line_stays_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: lora_r is set but method is 'ia3' \(lora_r is for lora"):
        load_config(QUICKSTART, ["--method", "ia3", "--lora_r", "4"])
    with pytest.raises(ConfigError, match=r"^command line: prefix_num_virtual_tokens is set but method is 'lora'"):
        load_config(QUICKSTART, ["--prefix_num_virtual_tokens", "8"])
    # the file's own mistake still names the file
    with pytest.raises(ConfigError, match=r"exp\.yaml: lora_r is set but method is 'prefix'"):
        load_config(write(tmp_path, BASE + "method: prefix\nlora_r: 8\n"), [])
    # nulling another method's option on the command line is no error: it sets nothing
    assert load_config(QUICKSTART, ["--method", "ia3", "--lora_r", "null"]).method.lora_r is None


# --- the command line: --config, key=value, accelerate flags, help text with '%'
def test_config_flag_is_the_experiment_file(tmp_path):
    path = write(tmp_path, BASE + "learning_rate: 1.0e-3\n")
    assert load_config(None, ["--config", str(path), "--seed", "3"]).training.seed == 3
    assert load_config(None, [f"--config={path}"]).training.learning_rate == pytest.approx(1e-3)
    assert load_config(None, ["--config", str(path)]).training.output_dir == "runs/exp"
    with pytest.raises(ConfigError, match="the experiment file is given twice"):
        load_config(path, ["--config", str(path)])
    with pytest.raises(ConfigError, match="--config needs an experiment file"):
        load_config(None, ["--config"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["learning_rate=3e-4"], r"command line: 'learning_rate=3e-4' is not a flag; write --learning_rate 3e-4$"),
        (["--seed", "1", "lora_target_modules=query"], r"write --lora_target_modules query$"),
        (["output_dir="], r"write --output_dir VALUE$"),
        (["--num_processes", "2"], r"--num_processes is an `accelerate launch` option.*put it before `-m`"),
        (["--config_file", "accelerate_configs/multi_gpu.yaml"], r"--config_file is an `accelerate launch` option"),
        (["--mixed_precision", "bf16"], r"--mixed_precision is an `accelerate launch` option.*before `-m`"),
        (["--multi_gpu"], r"--multi_gpu is an `accelerate launch` option"),
        (["--num_processes=2"], r"--num_processes is an `accelerate launch` option"),
        (["stray"], r"unexpected argument 'stray'"),
    ],
)
def test_misplaced_arguments_say_what_to_write(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, BASE), overrides)


def test_a_key_value_in_place_of_the_file_says_to_write_a_flag():
    with pytest.raises(ConfigError, match=r"'seed=3' is not a flag; write --seed 3 after the experiment file"):
        load_config("seed=3", [])


def test_help_texts_with_a_percent_sign_render():
    """`querytune train --help` failed with `TypeError: %o format` on "% of queries held out" in a help text."""
    from querytune.config import RaisingParser as _RaisingParser
    from querytune.config import sections

    text = _RaisingParser(sections()).format_help()
    assert "% of queries held out as test" in text and "--unseen_labels" in text


# --- unseen_labels and split names are checked like every key
def test_unseen_labels_and_split_names_are_checked(tmp_path):
    assert load_config(write(tmp_path, BASE)).data.unseen_labels == "error"
    assert load_config(write(tmp_path, BASE + "unseen_labels: as_wrong\n")).data.unseen_labels == "as_wrong"
    with pytest.raises(ConfigError, match=r"unseen_labels must be one of \('error', 'as_wrong', 'drop'\), got 'skip'"):
        load_config(write(tmp_path, BASE), ["--unseen_labels", "skip"])
    for bad in ("../x", "a/b", "..", "a\\b"):
        with pytest.raises(ConfigError, match="test_split must be a plain split name"):
            load_config(write(tmp_path, BASE), ["--test_split", bad])
