"""Loading a downloaded run must not run code from the Hub unasked: a run's saved `trust_remote_code: true` is
ignored by predict / eval / export / serve unless the user passes --trust_remote_code to that command.

The test builds a base model whose config maps AutoModelForSequenceClassification to custom code that leaves a
marker file when it is imported, trains a LoRA run on it with trust_remote_code, and predicts in fresh processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from querytune.cli import build_parser, main
from querytune.inference import LoadedRun

from .conftest import tiny_experiment

CUSTOM_CODE = '''import os

from transformers import BertForSequenceClassification

if os.environ.get("QT_TRUST_MARKER"):
    with open(os.environ["QT_TRUST_MARKER"], "w") as fh:
        fh.write("the base model's custom code ran")


class CustomBertForSequenceClassification(BertForSequenceClassification):
    """BERT under another name: what a Hub model with its own modelling code looks like."""
'''


@pytest.fixture(scope="module")
def custom_code_run(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("trust")
    base = tmp / "custom_bert"
    shutil.copytree(tiny_bert, base)
    (base / "modeling_custom.py").write_text(CUSTOM_CODE)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomBertForSequenceClassification"}
    (base / "config.json").write_text(json.dumps(config))
    exp = tiny_experiment(tmp, base, tiny_data, method="lora", trust_remote_code=True)
    assert main(["train", str(exp)]) == 0
    return tmp / "run"


def _predict(run, tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, bool]:
    marker = tmp_path / "custom-code-ran"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "QT_TRUST_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "querytune", "predict", str(run), "cheap shoes", *flags],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    return proc, marker.exists()


def test_saved_trust_remote_code_is_ignored_unless_the_command_says_so(custom_code_run, tmp_path):
    plain, ran = _predict(custom_code_run, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert not ran, "predict ran the base model's custom code without --trust_remote_code"
    assert "trained with trust_remote_code: true" in plain.stderr and "--trust_remote_code" in plain.stderr
    trusted, ran = _predict(custom_code_run, tmp_path, "--trust_remote_code")
    assert trusted.returncode == 0, trusted.stderr
    assert ran, "--trust_remote_code did not reach the base model's loading"
    # the custom class is BERT under another name: the same prediction either way
    assert json.loads(plain.stdout)["label"] == json.loads(trusted.stdout)["label"]


def test_loaded_run_takes_trust_as_a_parameter(custom_code_run):
    assert LoadedRun(custom_code_run).config.model.trust_remote_code is False
    assert LoadedRun(custom_code_run, trust_remote_code=True).config.model.trust_remote_code is True


@pytest.mark.parametrize("command", ["predict", "eval", "export", "serve"])
def test_every_loading_command_has_the_flag(command):
    argv = [command, "RUN", *(["q"] if command == "predict" else []), "--trust_remote_code"]
    args = build_parser().parse_args(argv)
    assert args.trust_remote_code is True
    assert build_parser().parse_args(argv[:-1]).trust_remote_code is False
