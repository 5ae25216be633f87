"""Sweeps: W&B sweep files are valid for W&B's own sweep logic and name real keys; the same file runs offline with
Optuna, durably: a study file, resume after a kill, failed trials recorded, secrets kept out."""

from __future__ import annotations

import importlib
import json
import sqlite3
import warnings

import pytest
import yaml

from querytune.config import ConfigError, load_config
from querytune.errors import RunError
from querytune.runs import MARKER, read_run
from querytune.sweep import STUDY_FILE, _as_flags, load_sweep, redact, run_sweep

from .conftest import REPO, tiny_experiment
from .test_resume import kill_when_held, start_held

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
SECRET = "hf_SWEEPsecretNEVERwritten"


def wandb_sweeps():
    """W&B's open-source sweep logic (PyPI `sweeps`, installed with --no-deps: it pins numpy<2 but runs on 2.x).

    The repository's own `sweeps/` folder has no __init__.py, so only the installed package can satisfy this."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic v2 warns about the package's v1-style config
        sweeps = importlib.import_module("sweeps")
        assert getattr(sweeps, "__file__", None) and hasattr(sweeps, "next_runs"), (
            "W&B's `sweeps` package is not installed: pip install --no-deps sweeps==0.3.0 jsonref==1.1.0"
        )
        config = importlib.import_module("sweeps.config")
    return sweeps, config.schema_violations_from_proposed_config


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_committed_sweeps_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    spec = yaml.safe_load(path.read_text())
    assert "accelerate" in spec["command"] and "${args}" in spec["command"]
    assert spec["project"], "`wandb sweep` puts the sweep in this project"
    sweeps, violations = wandb_sweeps()
    assert violations(spec) == [], "W&B's own schema accepts the file"
    assert sweeps.SweepConfig(spec)["method"] == spec["method"]
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
    for t in summary["trials"]:  # a trial stopped by the pruner is not marked like a complete run
        expected = {"COMPLETE": "finished", "PRUNED": "pruned"}[t["state"]]
        assert read_run(t["run_dir"], "any")["status"] == expected
    saved = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert saved["best"]["trial"] == best["trial"]
    assert "**Best: trial" in (tmp_path / "sweep" / "sweep_summary.md").read_text()


def test_grid_sweep_covers_the_grid(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", eval_strategy="steps", eval_steps=2)
    path = write_sweep(tmp_path, exp, method="grid", parameters={"lora_r": {"values": [2, 4]}})
    summary = run_sweep(path, trials=10, output_dir=tmp_path / "sweep")
    assert sorted(t["params"]["lora_r"] for t in summary["trials"]) == [2, 4]


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", eval_strategy="steps", eval_steps=2)
    path = write_sweep(tmp_path, exp, method="grid", parameters={"lora_r": {"values": [0, 2]}})
    out = tmp_path / "sweep"
    summary = run_sweep(path, trials=2, output_dir=out, extra_args=["--hub_token", SECRET])
    by_r = {t["params"]["lora_r"]: t for t in summary["trials"]}
    assert by_r[0]["state"] == "FAIL" and "ValueError" in by_r[0]["error"] and "lora" in by_r[0]["error"]
    assert by_r[2]["state"] == "COMPLETE" and summary["best"]["params"] == {"lora_r": 2}
    assert "| FAIL |" in (out / "sweep_summary.md").read_text()
    assert (out / STUDY_FILE).is_file()
    with sqlite3.connect(out / STUDY_FILE) as db:  # the study is a real SQLite file Optuna can reopen
        assert db.execute("select count(*) from trials").fetchone()[0] == 2

    # the token reached the trials (as a flag) but no file of the sweep, not even the study or a checkpoint
    assert "--hub_token REDACTED" in summary["best"]["command"]
    for file in out.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_redact_hides_secret_flags_and_keeps_counts():
    argv = ["--hub_token", "hf_x", "--wandb_api_key=abc", "--prompt_num_virtual_tokens", "20", "--token", "t",
            "--learning_rate", "0.1"]  # fmt: skip
    assert redact(argv) == ["--hub_token", "REDACTED", "--wandb_api_key=REDACTED", "--prompt_num_virtual_tokens",
                            "20", "--token", "REDACTED", "--learning_rate", "0.1"]  # fmt: skip


def test_a_sweep_directory_is_never_silently_reused(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", eval_strategy="steps", eval_steps=2)
    path = write_sweep(tmp_path, exp, method="grid", parameters={"lora_r": {"values": [2]}})
    with pytest.raises(RunError, match="no sweep to continue"):
        run_sweep(path, trials=1, output_dir=tmp_path / "sweep", resume=True)
    run_sweep(path, trials=1, output_dir=tmp_path / "sweep")
    with pytest.raises(RunError, match="already holds a sweep: continue it with --resume"):
        run_sweep(path, trials=1, output_dir=tmp_path / "sweep")
    again = run_sweep(path, trials=1, output_dir=tmp_path / "sweep", resume=True)
    assert [t["state"] for t in again["trials"]] == ["COMPLETE"], "a finished sweep resumed runs nothing"


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", max_steps=3, eval_strategy="steps",
                          eval_steps=1)  # fmt: skip
    path = write_sweep(tmp_path, exp, parameters={"learning_rate": {"min": 0.001, "max": 0.05},
                                                  "lora_r": {"values": [2, 4]}})  # fmt: skip
    out = tmp_path / "sweep"
    flag = tmp_path / "held"
    # killed during the first step of the second trial
    kill_when_held(start_held(["sweep", path, "--trials", "3", "--sweep_dir", str(out)], flag, step=1, call=2), flag)
    written = json.loads((out / "sweep_summary.json").read_text())
    assert [(t["trial"], t["state"]) for t in written["trials"]] == [(0, "COMPLETE"), (1, "RUNNING")], (
        "the summary is rewritten after every trial"
    )
    first_marker = (out / "trial-000" / MARKER).stat().st_mtime_ns

    summary = run_sweep(path, trials=3, output_dir=out, resume=True)
    states = [(t["trial"], t["state"]) for t in summary["trials"]]
    assert states == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE")]
    interrupted, retry = summary["trials"][1], summary["trials"][2]
    assert interrupted["error"].startswith("interrupted") and retry["retry_of"] == 1
    assert retry["params"] == interrupted["params"], "the interrupted trial runs again with its values"
    assert (out / "trial-000" / MARKER).stat().st_mtime_ns == first_marker, "a finished trial is not re-run"
    assert not (out / "trial-001" / MARKER).exists()
    for t in (0, 2, 3):
        assert read_run(out / f"trial-{t:03d}")["status"] == "finished"
    assert summary["best"]["trial"] in (0, 2, 3)
