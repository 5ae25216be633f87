"""Two "machines" on loopback, as users launch them on a cluster: one `accelerate launch --num_machines 2
--machine_rank R` per machine, each from its own working directory (so a relative output_dir shows which one wrote).

- The job equals one process of the same global batch (losses and weights), for intent and slots.
- Only machine 0 writes: the run directory, the marker, the W&B run.
- A machine that never joins stops after `querytune launch --join_timeout_s` with one line; a process that dies
  mid-run stops the others within ddp_timeout, non-zero, with one line naming the rank and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..conftest import REPO, build_tiny_checkpoint, tiny_experiment

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(rank: int, port: int, script: list[str], join_timeout_s: float = 120) -> list[str]:
    """`querytune launch` (accelerate launch with a bounded rendezvous) for machine `rank` of 2, one process each."""
    return [sys.executable, "-m", "querytune.launch", "--join_timeout_s", str(join_timeout_s), "--multi_gpu",
            "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip",
            "127.0.0.1", "--main_process_port", str(port), *script]  # fmt: skip


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts each worker in its own session, so killing the
    launcher's process group leaves the workers running)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _start(cwd: Path, cmd: list[str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "WANDB_DIR": str(cwd)}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    from ..conftest import SLOT_WORDS

    folder = tmp_path_factory.mktemp("bert_nodrop")
    return build_tiny_checkpoint("bert", folder, SLOT_WORDS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "train_log.json").read_text()) if "loss" in e]


@pytest.mark.parametrize("task", ["intent", "slots"])
def test_two_machines_on_loopback_equal_one_process_and_only_machine_0_writes(tmp_path, task, no_dropout_bert,
                                                                              tiny_data, slot_data):  # fmt: skip
    # Slots train with plain SGD: each process averages the loss over its own tokens, so a 4 + 4 split weighs tokens
    # slightly differently from one batch of 8 (4e-4 relative on the logged loss), and Adam's first steps (about
    # lr x sign(gradient)) would turn that into whole-lr flips of near-zero gradients; SGD keeps it proportional.
    data, keys = (
        (tiny_data, {})
        if task == "intent"
        else (slot_data, {"task": "slots", "label_column": "intent", "optim": "sgd", "learning_rate": 0.05})
    )
    keys = {"learning_rate": 0.005, **keys}
    exp = tiny_experiment(tmp_path, no_dropout_bert, data, max_steps=4, logging_steps=1, warmup_steps=0,
                          report_to="wandb", output_dir="runs/job", **keys)  # fmt: skip
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, "-m", "querytune.train", str(exp), "--per_device_train_batch_size", "8"],
                            cwd=tmp_path / "one", env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    port = _port()
    module = ["-m", "querytune.train", str(exp), "--per_device_train_batch_size", "4"]
    machines = [_start(tmp_path / f"machine{r}", _launcher(r, port, module)) for r in (0, 1)]
    for m in machines:
        out, _ = m.communicate(timeout=600)
        assert m.returncode == 0, out[-4000:]
    one, job = tmp_path / "one" / "runs" / "job", tmp_path / "machine0" / "runs" / "job"
    assert json.loads((job / "all_results.json").read_text())["world_size"] == 2
    rel, weights = (1e-4, 1e-5) if task == "intent" else (2e-3, 2e-3)  # slots: token weighting, see above
    assert _losses(job) == pytest.approx(_losses(one), rel=rel) and len(_losses(one)) == 4
    a, b = load_file(one / "model.safetensors"), load_file(job / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < weights, "the machines trained one synchronised model"
    assert (job / "querytune_run.json").is_file()
    assert not (tmp_path / "machine1" / "runs" / "job" / "querytune_run.json").exists(), "machine 1 wrote no run"
    assert len(list((tmp_path / "machine0" / "wandb").glob("offline-run-*"))) == 1
    assert not list((tmp_path / "machine1").glob("wandb/offline-run-*")), "one W&B run, machine 0's"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_machine_that_never_joins_stops_the_job_within_the_join_timeout(tmp_path, rank, no_dropout_bert, tiny_data):
    """Machine 0 alone waits for machine 1; machine 1 alone cannot reach machine 0. Either stops after the join
    timeout with one line (how many joined, where), exit 2, no traceback; plain accelerate launch waits forever."""
    exp = tiny_experiment(tmp_path, no_dropout_bert, tiny_data, max_steps=4)
    start = time.monotonic()
    lone = _start(tmp_path / f"machine{rank}", _launcher(rank, _port(), ["-m", "querytune.train", str(exp)], 15))
    out, _ = lone.communicate(timeout=300)
    took = time.monotonic() - start
    assert lone.returncode == 2 and 15 <= took < 120, (took, out[-3000:])
    lines = [line for line in out.splitlines() if line.startswith("querytune: error: ")]
    assert len(lines) == 1 and f"machine {rank} of 2" in lines[0] and "127.0.0.1:" in lines[0], out[-3000:]
    assert ("only 1 of 2 machines joined" if rank == 0 else "could not reach machine 0") in lines[0], lines[0]
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "run").exists(), "nothing written by a job that never started"


def test_a_process_that_dies_mid_run_stops_the_others(tmp_path, no_dropout_bert, tiny_data):
    exp = tiny_experiment(tmp_path, no_dropout_bert, tiny_data, max_steps=40, ddp_timeout=60)
    port = _port()
    flag = tmp_path / "held"
    hold = [str(REPO / "tests" / "hold.py"), str(flag), "3", "1", "train", str(exp)]
    survivor = _start(tmp_path / "machine0", _launcher(0, port, ["-m", "querytune.train", str(exp)]))
    doomed = _start(tmp_path / "machine1", _launcher(1, port, hold))
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert doomed.poll() is None and time.monotonic() < deadline, doomed.stdout.read()
            time.sleep(0.2)
        start = time.monotonic()
        _kill_tree(doomed.pid)  # machine 1, launcher and process, gone at once
        doomed.wait(timeout=60)
        out, _ = survivor.communicate(timeout=300)
    finally:
        _kill_tree(survivor.pid)
        _kill_tree(doomed.pid)
    assert survivor.returncode != 0 and time.monotonic() - start < 120, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("querytune: error: rank 0 of 2")]
    assert len(lines) == 1 and "gone" in lines[0], out[-3000:]
    assert any(line.startswith("querytune: error: machine 0 of 2: 1 process(es) of the job failed")
               for line in out.splitlines()), out[-3000:]  # fmt: skip
