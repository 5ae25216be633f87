"""Sweeps: W&B sweep files parse and name real keys; the same file runs offline with Optuna."""

from __future__ import annotations

import json

import pytest
import yaml

from querytune.config import ConfigError, load_config
from querytune.sweep import _as_flags, load_sweep, run_sweep

from .conftest import REPO, tiny_experiment

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_committed_sweeps_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    spec = yaml.safe_load(path.read_text())
    assert "accelerate" in spec["command"] and "${args}" in spec["command"]
    # every swept parameter is a key the experiment accepts, with a value of the right type
    for name, p in sweep.parameters.items():
        for value in p.get("values") or [p.get("min"), p.get("max")]:
            load_config(sweep.experiment, [*sweep.fixed_args, *_as_flags({name: value})])


def write_sweep(tmp_path, experiment, **spec) -> str:
    base = {"method": "random", "metric": {"name": "eval/accuracy", "goal": "maximize"},
            "command": ["${env}", "accelerate", "launch", "-m", "querytune.train", str(experiment), "${args}"]}  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**base, **spec}))
    return str(path)


@pytest.mark.parametrize(
    ("parameters", "method", "expected"),
    [
        ({"learning_rate": {"distribution": "normal", "mu": 0, "sigma": 1}}, "random", "distribution 'normal'"),
        ({"learning_rate": {"distribution": "q_log_uniform_values", "min": 1, "max": 2}}, "bayes", "not support"),
        ({"learning_rate": {"min": 0.001, "max": 0.01}}, "grid", "grid sweep needs `values`"),
        ({"lora_r": {"values": [2, 4], "probabilities": [0.5, 0.5]}}, "random", "probabilities"),
    ],
)
def test_unsupported_sweeps_are_refused_clearly(tmp_path, tiny_bert, tiny_data, parameters, method, expected):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora")
    with pytest.raises(ConfigError, match=expected):
        load_sweep(write_sweep(tmp_path, exp, parameters=parameters, method=method))


def test_unknown_parameter_fails_before_any_trial(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora")
    path = write_sweep(tmp_path, exp, parameters={"lora_rank": {"values": [2, 4]}})
    with pytest.raises(ConfigError, match="unknown key 'lora_rank'"):
        run_sweep(path, trials=2, output_dir=tmp_path / "sweep")
    assert not list((tmp_path / "sweep").glob("trial-*"))


def test_offline_sweep_runs_trials_as_separate_wandb_runs(tmp_path, tiny_bert, tiny_data, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", max_steps=4, eval_strategy="steps",
                          eval_steps=1, report_to="wandb")  # fmt: skip
    path = write_sweep(
        tmp_path, exp,
        parameters={"learning_rate": {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2},
                    "lora_r": {"values": [2, 4]}},
        early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
    )  # fmt: skip
    summary = run_sweep(path, trials=4, output_dir=tmp_path / "sweep")
    assert len(summary["trials"]) == 4
    states = {t["state"] for t in summary["trials"]}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert all(t["intermediate"] for t in summary["trials"]), "evaluations are reported to the pruner"
    best = summary["best"]
    values = [t["value"] for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert best["value"] == max(values)
    assert best["config"]["learning_rate"] == pytest.approx(best["params"]["learning_rate"])
    assert best["config"]["lora_r"] == best["params"]["lora_r"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 4, "one W&B run per trial"
    saved = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert saved["best"]["trial"] == best["trial"]
    assert "**Best: trial" in (tmp_path / "sweep" / "sweep_summary.md").read_text()


def test_grid_sweep_covers_the_grid(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", eval_strategy="steps", eval_steps=2)
    path = write_sweep(tmp_path, exp, method="grid", parameters={"lora_r": {"values": [2, 4]}})
    summary = run_sweep(path, trials=10, output_dir=tmp_path / "sweep")
    assert sorted(t["params"]["lora_r"] for t in summary["trials"]) == [2, 4]
