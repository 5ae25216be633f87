"""Distributed sweeps on a real database: three workers share one Optuna study in a PostgreSQL server that the test
starts (the Debian `postgresql` package, psycopg from the `postgres` extra); a worker killed with SIGKILL
mid-trial loses nothing (its trial is failed by the heartbeat and run again by another worker); a bad URL or a server
that is down is one clear line, exit 2, within the connect timeout."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from querytune.runs import read_run

from .conftest import REPO, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "WANDB_MODE": "disabled"}  # fmt: skip
HOLD = REPO / "tests" / "hold.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the test's own on a free loopback port, a database `sweeps`; stopped afterwards."""
    if not PG_BIN:
        pytest.fail("the PostgreSQL server is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="pip install 'querytune[postgres]'")
    binaries = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="querytune-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()
    subprocess.run(_as_postgres([str(binaries / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True, cwd=root)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(_as_postgres([str(binaries / "pg_ctl"), "-D", str(root / "data"), "-o", options, "-w", "-l",
                                 str(root / "server.log"), "start"]), check=True, capture_output=True, cwd=root)  # fmt: skip
    try:
        subprocess.run(_as_postgres([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                     "sweeps"]), check=True, capture_output=True, cwd=root)  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run(_as_postgres([str(binaries / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"]),
                       capture_output=True, cwd=root)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def _sweep_file(tmp_path: Path, experiment: Path) -> Path:
    spec = {"name": "pg", "method": "random", "metric": {"name": "eval/accuracy", "goal": "maximize"},
            "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1}},
            "command": ["${env}", "accelerate", "launch", "-m", "querytune.train", str(experiment), "${args}"]}  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_three_workers_share_a_postgres_study_and_a_killed_one_loses_nothing(postgres, tmp_path, tiny_bert,
                                                                           tiny_data):  # fmt: skip
    import optuna

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, max_steps=6, logging_steps=1)
    sweep = _sweep_file(tmp_path, exp)
    shared = tmp_path / "shared"
    args = ["sweep", str(sweep), "--storage", postgres, "--trials", "6", "--sweep_dir", str(shared),
            "--heartbeat_s", "2"]  # fmt: skip
    flag = tmp_path / "held"
    held = subprocess.Popen([sys.executable, str(HOLD), str(flag), "3", "1", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert held.poll() is None and time.monotonic() < deadline, held.stdout.read() if held.poll() else "no hold"
        time.sleep(0.2)
    held.send_signal(signal.SIGKILL)
    held.wait(timeout=60)
    workers = [subprocess.Popen([sys.executable, "-m", "querytune", *args], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    for w in workers:
        out, _ = w.communicate(timeout=1200)
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="pg", storage=postgres)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(failed) == 1, "the killed worker's trial, failed by the heartbeat"
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params, "run again, with its values, exactly once"
    assert 6 <= len(complete) <= 8, "the trials asked for (workers finishing at once may run one more each)"
    dirs = [t.user_attrs["run_dir"] for t in complete]
    assert len(set(dirs)) == len(dirs), "every trial in its own run directory"
    for t in complete:
        assert read_run(t.user_attrs["run_dir"])["status"] == "finished"
        assert json.loads((Path(t.user_attrs["run_dir"]) / "all_results.json").read_text())["eval_accuracy"] == t.value
    summary = json.loads((shared / "sweep_summary.json").read_text())
    assert {r["trial"] for r in summary["trials"]} == {t.number for t in trials}, "the summary holds the whole study"
    assert next(r for r in summary["trials"] if r["trial"] == retries[0].number)["retry_of"] == failed[0].number


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:{closed}/sweeps", "nosuchdb://somewhere/x"])
def test_a_bad_url_or_a_server_that_is_down_is_one_clear_line(tmp_path, tiny_bert, tiny_data, url):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data)
    storage = url.format(closed=_free_port())
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "querytune", "sweep", str(_sweep_file(tmp_path, exp)), "--storage",
                           storage, "--sweep_dir", str(tmp_path / "s")], env=ENV, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("querytune: error")]
    assert proc.returncode == 2 and len(errors) == 1 and "sweep storage" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 60
