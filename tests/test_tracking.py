"""W&B: offline without a key, one run per training, metrics and reports readable back from disk, and an
unreachable server that costs a short timeout and one notice, never the training."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from querytune.config import load_config
from querytune.train import run

from .conftest import tiny_experiment


def read_offline_run(run_dir) -> dict:
    """Read a W&B offline run back with wandb's own reader (`wandb leet inspect --summary --json`)."""
    proc = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    (tmp_path / "home").mkdir()
    return tmp_path / "wb" / "wandb"


def test_two_trainings_make_two_offline_runs_with_metrics(tmp_path, tiny_bert, tiny_data, wandb_offline_env, capsys):
    names = []
    for i in range(2):
        (tmp_path / f"t{i}").mkdir()
        exp = tiny_experiment(tmp_path / f"t{i}", tiny_bert, tiny_data, method="lora", report_to="wandb",
                              run_name=f"run-{i}", wandb_group="unit", logging_steps=1)  # fmt: skip
        result = run(load_config(exp))
        names.append((f"run-{i}", result.metrics["test_accuracy"]))
    assert "no W&B API key found: logging offline" in capsys.readouterr().out
    runs = sorted(wandb_offline_env.glob("offline-run-*"))
    assert len(runs) == 2, "two trainings in one process must not share a W&B run"
    for run_dir, (name, accuracy) in zip(runs, names, strict=True):
        record = read_offline_run(run_dir)
        assert record["name"] == name
        summary = record["summary"]
        assert summary["test_accuracy"] == pytest.approx(accuracy)
        assert summary["method"] == "lora" and 0 < summary["trainable_percent"] < 100
        assert summary["report/test_report"]["nrows"] == 4 + 2  # 4 intents + macro/weighted averages
        assert "plots/test_confusion" in summary
        assert "lora_r" in json.dumps(record["config"]), "the full querytune config is logged"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_wandb_server_falls_back_to_offline_and_trains_on(tmp_path, tiny_bert, tiny_data,
                                                                      wandb_offline_env, monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # a key, so W&B tries to go online
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", report_to="wandb", run_name="outage")
    result = run(load_config(exp))
    out = capsys.readouterr().out
    assert out.count("W&B did not answer") == 1 and "training goes on with W&B offline" in out
    assert "no W&B API key" not in out
    (offline,) = wandb_offline_env.glob("offline-run-*")
    record = read_offline_run(offline)
    assert record["name"] == "outage" and record["summary"]["test_accuracy"] == pytest.approx(
        result.metrics["test_accuracy"]
    )
    assert json.loads((tmp_path / "run" / "querytune_run.json").read_text())["status"] == "finished"


def test_the_init_timeout_is_read_at_each_training_not_once_per_process(tmp_path, tiny_bert, tiny_data,
                                                                         wandb_offline_env, monkeypatch, capsys):  # fmt: skip
    """wandb reads WANDB_INIT_TIMEOUT once per process: after an earlier W&B run in the same process (a sweep, the
    test suite) its cached 90 s applied (this file's outage test took 92 s after the sweep tests). querytune passes
    the current value to every `wandb.init`. The real wandb client meets a server that accepts connections and never
    answers: each start waits about the timeout set at that moment, then goes offline."""
    import time

    from querytune.errors import ConfigError
    from querytune.tracking import init_timeout, start_run

    from .test_hub import silent_port

    sock, port = silent_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # a key, so W&B tries to go online
    config = load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, report_to="wandb"))
    try:
        for value in ("2", "6"):  # a longer one second: a value cached from the first would cut it short
            monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
            start = time.monotonic()
            wandb_run = start_run(config)
            waited = time.monotonic() - start
            wandb_run.finish()
            assert float(value) - 0.5 <= waited < float(value) + 30, (value, waited)
            assert "W&B did not answer" in capsys.readouterr().out and wandb_run.offline
    finally:
        sock.close()
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="WANDB_INIT_TIMEOUT must be a number of seconds, got 'soon'"):
        init_timeout()
