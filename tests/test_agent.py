"""A W&B sweep under `wandb agent`, emulated exactly: two trials back to back, each from a sweep file's `command`.

The agent needs the W&B server to hand out parameters, so this test plays only the server's part: the parameters
are drawn by W&B's open-source sweep logic (PyPI `sweeps`) and handed, as the server's `run` command, to wandb's
own `Agent._command_run`, which writes the trial's config file, sets WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH, expands
`${env}`, `${interpreter}`, `${program}`, `${args}`... in the sweep's `command` and starts the process, as
`wandb agent` does. The command is the committed sweep file's, `accelerate launch` included (on CPU through
ACCELERATE_USE_CPU=1), with only the experiment swapped for a tiny one, and W&B offline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from querytune.runs import read_run

from .conftest import REPO, tiny_experiment
from .test_sweep import wandb_sweeps
from .test_tracking import read_offline_run


@pytest.mark.slow
def test_two_agent_trials_back_to_back_each_in_its_own_run(tmp_path, tiny_bert, tiny_data, monkeypatch, capfd):
    from wandb.sdk.lib.runid import generate_id
    from wandb.wandb_agent import Agent

    sweeps, violations = wandb_sweeps()
    spec = yaml.safe_load((REPO / "sweeps" / "intent-lora.yaml").read_text())
    experiment = "experiments/intent/clinc150-lora.yaml"
    assert experiment in spec["command"]
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", eval_strategy="steps", eval_steps=2,
                          output_dir=str(tmp_path / "runs" / "agent"), run_name="agent")  # fmt: skip
    spec["command"] = [str(exp) if item == experiment else item for item in spec["command"]]
    # how the server draws is not under test; random needs no finished runs with metrics (the file says bayes)
    spec["method"] = "random"
    assert violations(spec) == []

    sweep_id, wandb_dir = generate_id(8), tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    # what `wandb agent` has in its environment when it starts a trial (it sets WANDB_RUN_ID and the param path)
    for key, value in {"WANDB_SWEEP_ID": sweep_id, "WANDB_PROJECT": spec["project"], "WANDB_DIR": str(wandb_dir),
                       "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1",
                       "WANDB_RUN_ID": "", "WANDB_SWEEP_PARAM_PATH": "",
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
                       }.items():  # fmt: skip
        monkeypatch.setenv(key, value)  # restored after the test, including what the agent sets
    monkeypatch.chdir(REPO)  # the sweep command names accelerate_configs/ relative to the repository
    agent = Agent(api=None, queue=None, sweep_id=sweep_id)
    agent._sweep_command = spec["command"]  # what the agent reads from the sweep's config on the server

    done: list = []
    for _ in range(2):
        (draw,) = sweeps.next_runs(sweeps.SweepConfig(spec), done, validate=True, n=1)
        params = {k: {"value": v["value"].item() if hasattr(v["value"], "item") else v["value"]}
                  for k, v in draw.config.items()}  # fmt: skip
        run_id = generate_id()
        agent._command_run({"type": "run", "run_id": run_id, "program": spec.get("program"), "args": params})
        code = agent._run_processes[run_id].wait(timeout=900)
        captured = capfd.readouterr()
        assert code == 0, captured.out[-3000:] + captured.err[-6000:]

        out = tmp_path / "runs" / "agent" / sweep_id / run_id
        info = read_run(out)
        assert info["status"] == "finished"
        saved = yaml.safe_load((out / "querytune_config.yaml").read_text())
        for key in ("learning_rate", "lora_r", "lora_alpha"):
            assert saved[key] == params[key]["value"], key
        assert saved["output_dir"] == str(out)
        (offline,) = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")
        record = read_offline_run(offline)
        assert record["run_id"] == run_id and record["name"] == f"agent-{run_id}"
        for key in ("learning_rate", "lora_r", "lora_alpha"):
            assert record["config"][key] == params[key]["value"], f"the W&B run carries its swept {key}"
        done.append(sweeps.SweepRun(name=run_id, state=sweeps.RunState.finished, config=draw.config,
                                    summary_metrics={"eval/accuracy": info["metrics"]["eval_accuracy"]}))  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "runs" / "agent" / sweep_id).iterdir()) == sorted(r.name for r in done)
