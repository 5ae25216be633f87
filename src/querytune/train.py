"""Train one querytune experiment with 🤗 Trainer: any task, any method.

    querytune train experiments/intent/clinc150-lora.yaml --learning_rate 3e-4 --output_dir runs/x
    python -m querytune.train experiments/quickstart.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m querytune.train experiments/...yaml

Flags after the experiment file override its keys. The run directory gets the resolved config first (so that an
interrupted run can be resumed with `querytune train RUN/querytune_config.yaml --resume_from_checkpoint last`),
then checkpoints, the model or adapter with its head and model config, the tokenizer, the label map, metrics,
reports, plots and a model card; then the W&B run is finished and the Hub push made, and last of all the
`querytune_run.json` marker records how the run ended (`finished`, `pruned` or `failed_after_training`).

Under `wandb agent` (WANDB_SWEEP_ID and WANDB_RUN_ID set), each trial trains into `<output_dir>/<sweep id>/<run id>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # Windows: no getrusage, so a CPU run records no peak memory figure
    resource = None

import datasets
import torch
import transformers
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, set_seed

from querytune import __version__, tracking
from querytune.augment.pipeline import augment_train
from querytune.config import ExperimentConfig, load_config
from querytune.errors import ConfigError, PushError, RunError, run_guarded
from querytune.hub import hub_model_id, push_run, write_model_card
from querytune.methods import get_method
from querytune.methods.builders import MethodContext, apply_method, method_callbacks
from querytune.models import count_parameters, load_tokenizer, resolve_model_path
from querytune.runs import (
    CONFIG_FILE,
    FAILED_AFTER_TRAINING,
    FINISHED,
    LABEL_MAP,
    METRICS_FILE,
    PRUNED,
    dir_size_mb,
    last_complete_checkpoint,
    mark_run,
    model_files,
    prepare_output_dir,
    write_json_atomic,
)
from querytune.sampling import seeded
from querytune.tasks import get_task

logger = logging.getLogger("querytune")


class ThroughputCallback(TrainerCallback):
    """Training samples/s over optimizer steps only (evaluation and checkpointing excluded), and peak memory."""

    def __init__(self) -> None:
        self.step_time = 0.0
        self.steps = 0
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_time += time.perf_counter() - self._t0
            self.steps += 1
            self._t0 = None

    def samples_per_second(self, args) -> float:
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return self.steps * batch / self.step_time if self.step_time else 0.0


def peak_memory_mb() -> tuple[float | None, str]:
    """Peak accelerator memory allocated by torch, or this process's peak resident memory on CPU (None where the
    platform has no `resource` module)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    if resource is None:
        return None, "unavailable"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def check_distributed(config: ExperimentConfig) -> None:
    """Fail loudly on the two silent multi-process traps (NOTES.md).

    - Several processes were launched but each trains alone (on CPU without use_cpu / ACCELERATE_USE_CPU=1 no
      process group is formed): every rank would write the same run directory with unsynchronised weights.
    - The ranks resolved different configs (e.g. a sweep's parameters reached only rank 0).
    """
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    args = config.training
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"{launched} processes were launched but training runs in {args.world_size}: on CPU set use_cpu: true "
            "(or ACCELERATE_USE_CPU=1) so the processes join one gloo group"
        )
    if args.world_size > 1 and torch.distributed.is_initialized():
        digest = hashlib.sha256(json.dumps(config.to_flat_dict(), sort_keys=True, default=str).encode()).hexdigest()
        digests: list[str | None] = [None] * args.world_size
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {args.world_size} processes resolved different experiment configs: {digests}")


def setup_logging(config: ExperimentConfig) -> None:
    level = config.training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    # querytune's own progress lines are worth seeing on the main process even when transformers is quiet.
    logger.setLevel(min(level, logging.INFO) if config.training.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


@dataclass
class RunResult:
    """What a finished training leaves in memory (tests and sweeps use the model and trainer directly)."""

    metrics: dict[str, Any]
    model: Any
    tokenizer: Any
    trainer: Trainer
    output_dir: Path
    status: str = FINISHED  # or "pruned" (see querytune.runs)


def sweep_output_dir(output_dir: str) -> str:
    """Under `wandb agent` every trial gets the sweep file's fixed output_dir; give each its own folder."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not sweep_id or not run_id or Path(output_dir).parts[-2:] == (sweep_id, run_id):
        return output_dir
    return str(Path(output_dir) / sweep_id / run_id)


def check_steps(total_steps: int, train_rows: int, config: ExperimentConfig) -> None:
    """A run that would make no optimizer step is an error before training, never a 'finished' untrained model."""
    if train_rows == 0:
        raise ConfigError(f"{config.source}: the train split is empty: nothing to train on")
    if total_steps <= 0:
        args = config.training
        raise ConfigError(
            f"{config.source}: this run would train 0 steps (max_steps={args.max_steps}, num_train_epochs="
            f"{args.num_train_epochs}, {train_rows} train rows)"
        )


def run(config: ExperimentConfig, callbacks: list[TrainerCallback] | None = None) -> RunResult:
    """Train, evaluate and save one experiment; `callbacks` are added to the Trainer's (sweeps use this).

    A callback whose `pruned` attribute is true after training (a sweep's pruner) marks the run `pruned`.
    """
    setup_logging(config)
    started = time.time()
    out, resume = prepare_run(config)
    data = load_data(config, out)
    schedule = plan_schedule(config, len(data.encoded["train"]))
    model, trainable, total = build_model(config, data.task, schedule.steps)
    trainer, callbacks, wandb_run, hub = make_trainer(config, data, model, resume, callbacks)
    metrics, status = train_and_evaluate(trainer, callbacks, wandb_run, resume, data, schedule, out)
    finish_run(config, data, trainer, metrics, status, wandb_run, hub, out, (trainable, total), started)
    return RunResult(metrics=metrics, model=trainer.model, tokenizer=data.tokenizer, trainer=trainer, output_dir=out,
                     status=status)  # fmt: skip


@dataclass
class RunData:
    """The task, its tokenizer, the tokenised splits and what augmentation did (`augment_*` counts)."""

    task: Any
    tokenizer: Any
    encoded: Any
    augment_counts: dict[str, Any]


@dataclass
class Schedule:
    steps: int  # optimizer steps the run makes
    epochs: float


def prepare_run(config: ExperimentConfig) -> tuple[Path, str | None]:
    """The run directory (its resolved config written first, so that a run killed at any point can be resumed) and
    the checkpoint to resume from: `last` is the newest checkpoint holding every file Trainer and the method write."""
    tracking.check_extra(config)
    args = config.training
    args.output_dir = sweep_output_dir(args.output_dir)
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume == "last" and last_complete_checkpoint(out) is None:
        raise RunError(f"--resume_from_checkpoint last: no complete checkpoint-* folder in {out}")
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise RunError(f"--resume_from_checkpoint: checkpoint folder not found: {resume}")
    if args.should_save:
        prepare_output_dir(out, resume=resume is not None, overwrite=args.overwrite_output_dir)
        config.save(out / CONFIG_FILE)
    set_seed(args.seed)
    check_distributed(config)
    if resume == "last":
        found = last_complete_checkpoint(out, get_method(config.method.method).checkpoint_files)
        if found is None:
            raise RunError(f"--resume_from_checkpoint last: no complete checkpoint-* folder in {out}")
        resume = str(found)
        logger.info("resuming from %s", resume)
    return out, resume


def load_data(config: ExperimentConfig, out: Path) -> RunData:
    """The task's splits, the train split augmented (`augment`), tokenised; the main process first (it fills the
    caches the others read)."""
    args = config.training
    task = get_task(config.data.task)(config)
    with args.main_process_first(desc="loading and tokenising data"):
        splits = task.load_data()
        splits, augment_counts = augment_train(task, splits, config, out if args.should_save else None)
        tokenizer = load_tokenizer(
            config.model.tokenizer_name or config.model.model_name_or_path,
            config.model.model_revision,
            config.model.trust_remote_code,
        )
        encoded = task.tokenize(splits, tokenizer)
    logger.info("splits: %s; %d labels", {k: len(v) for k, v in encoded.items()}, len(task.labels))
    return RunData(task, tokenizer, encoded, augment_counts)


def plan_schedule(config: ExperimentConfig, train_rows: int) -> Schedule:
    """The optimizer steps of the run; `min_train_steps` raises the epochs of a small train set to reach it."""
    args = config.training
    steps_per_epoch = math.ceil(
        train_rows / (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps)
    )
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    check_steps(total_steps, train_rows, config)
    if args.max_steps <= 0 and args.min_train_steps and total_steps < args.min_train_steps:
        # exactly the floor (the last epoch may be partial), so that sets of different sizes under it get equal steps
        logger.info("min_train_steps %d: %d train rows make %d steps in %g epochs; training %d steps (%.1f epochs)",
                    args.min_train_steps, train_rows, total_steps, args.num_train_epochs, args.min_train_steps,
                    args.min_train_steps / steps_per_epoch)  # fmt: skip
        args.max_steps = total_steps = args.min_train_steps
        args.num_train_epochs = args.min_train_steps / steps_per_epoch
    return Schedule(total_steps, args.num_train_epochs)


def build_model(config: ExperimentConfig, task: Any, total_steps: int) -> tuple[Any, int, int]:
    """The task's model made trainable by the method; with its trainable and total parameter counts."""
    args = config.training
    model, new_modules = task.load_model()
    # These models return a per-process mean loss although their forward takes **kwargs; without this Trainer
    # rescales the loss by world size and accumulation steps (see NOTES.md).
    model.accepts_loss_kwargs = False
    ctx = MethodContext(
        task_type=task.peft_task_type,
        new_modules=new_modules,
        num_training_steps=total_steps,
        tokenizer_name_or_path=resolve_model_path(config.model.tokenizer_name or config.model.model_name_or_path),
    )
    model = apply_method(model, config.method, ctx)
    trainable, total = count_parameters(model)
    logger.info("method %s: %s trainable of %s parameters (%.3f%%)", config.method.method, f"{trainable:,}",
                f"{total:,}", 100 * trainable / total)  # fmt: skip
    if args.gradient_checkpointing and not get_method(config.method.method).gradient_checkpointing:
        raise ValueError(f"gradient_checkpointing does not work with method {config.method.method!r} (see NOTES.md)")
    return model, trainable, total


def make_trainer(config: ExperimentConfig, data: RunData, model: Any, resume: str | None,
                 extra: list[TrainerCallback] | None) -> tuple[Trainer, list[TrainerCallback], Any, tuple]:  # fmt: skip
    """The task's Trainer with querytune's callbacks (throughput, the method's, early stopping, the caller's), the
    run's W&B run, and the Hub push asked for (push, token), which Trainer itself must not make."""
    args, task = config.training, data.task
    if args.metric_for_best_model is None and args.load_best_model_at_end:
        args.metric_for_best_model = task.default_metric
        args.greater_is_better = True
    callbacks = [ThroughputCallback(), *method_callbacks(model, config.method, resume), *(extra or [])]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    # querytune pushes the finished run itself (card, label map, no checkpoints); Trainer must not push, and the
    # token must not reach training_args.bin, which Trainer pickles into every checkpoint.
    hub = (args.push_to_hub, args.hub_token)
    args.push_to_hub, args.hub_token = False, None
    wandb_run = tracking.start_run(config)
    trainer = seeded(task.trainer_class)(
        model=model,
        args=args,
        train_dataset=data.encoded["train"],
        eval_dataset=data.encoded["validation"],
        processing_class=data.tokenizer,
        data_collator=task.collator(data.tokenizer),
        compute_metrics=task.compute_metrics,
        callbacks=callbacks,
        **task.trainer_kwargs(data.tokenizer),
    )
    # how the job runs (DDP, DEEPSPEED, FSDP, ...), read now: accelerate's state can be reset by the time the run is
    # saved (a later Accelerator in the same process)
    trainer.querytune_distributed = {"type": str(trainer.accelerator.distributed_type.value),
                                     "processes": args.world_size,
                                     "mixed_precision": str(trainer.accelerator.mixed_precision)}  # fmt: skip
    return trainer, callbacks, wandb_run, hub


def train_and_evaluate(trainer: Trainer, callbacks: list, wandb_run: Any, resume: str | None, data: RunData,
                       schedule: Schedule, out: Path) -> tuple[dict[str, Any], str]:  # fmt: skip
    """Train (from `resume`), then score validation (choosing what the task chooses there) and test."""
    args = trainer.args
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    status = PRUNED if any(getattr(cb, "pruned", False) for cb in callbacks) else FINISHED
    metrics: dict[str, Any] = {f"train_{k}" if not k.startswith("train") else k: v
                               for k, v in train_result.metrics.items()}  # fmt: skip
    throughput = next(cb for cb in callbacks if isinstance(cb, ThroughputCallback))
    metrics["train_step_samples_per_second"] = throughput.samples_per_second(args)
    metrics["peak_memory_mb"] = peak_memory_mb()[0]
    metrics["world_size"] = args.world_size
    metrics |= data.augment_counts | {"train_rows": len(data.encoded["train"]), "schedule_epochs": schedule.epochs,
                                      "schedule_steps": schedule.steps}  # fmt: skip
    for role in ("validation", "test"):
        if role in data.encoded:
            metrics.update(data.task.evaluate_trained(trainer, data.encoded[role], role, out))
    return metrics, status


def finish_run(config: ExperimentConfig, data: RunData, trainer: Trainer, metrics: dict[str, Any],
               status: str, wandb_run: Any, hub: tuple, out: Path, params: tuple[int, int], started: float) -> None:  # fmt: skip
    """Save the model (main process only), label map, metrics and card; finish W&B; push; the marker last."""
    args, task, tokenizer = config.training, data.task, data.tokenizer
    (push, hub_token), (trainable, total) = hub, params
    augment_counts = data.augment_counts
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        if get_method(config.method.method).peft:
            save_portable_adapter_files(trainer.model, out, config)
        args.push_to_hub = push  # the saved config is what the user asked for
        config.save(out / CONFIG_FILE)
        write_json_atomic(out / LABEL_MAP, task.label_info())
        task.run_files(out)
        weights = model_files(out)
        metrics["model_size_mb"] = dir_size_mb(weights)
        write_json_atomic(out / METRICS_FILE, metrics)
        write_json_atomic(out / "train_log.json", trainer.state.log_history)
        info = {
            "querytune_version": __version__,
            "run_name": args.run_name or out.name,
            "task": config.data.task,
            "method": config.method.method,
            "peft": get_method(config.method.method).peft,
            "base_model": config.model.model_name_or_path,
            "dataset": config.data.dataset_name or config.data.train_file,
            "num_labels": len(task.labels),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "train_runtime_s": metrics.get("train_runtime", 0.0),
            "train_samples_per_second": metrics["train_step_samples_per_second"],
            "peak_memory_kind": peak_memory_mb()[1],
            "global_step": trainer.state.global_step,
            "wall_time_s": time.time() - started,
            "distributed": getattr(trainer, "querytune_distributed", None),  # how the job ran (DDP, DEEPSPEED, ...)
            "weights": [p.name for p in weights],
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("eval_", "test_"))},
        }
        if augment_counts or config.data.max_train_samples_per_label:
            info["training_data"] = {"max_train_samples_per_label": config.data.max_train_samples_per_label,
                                     "augment": config.augment.augment, **augment_counts}  # fmt: skip
        write_model_card(out, info)
        target = {"repo_id": args.hub_model_id or out.name, "token": hub_token, "private": args.hub_private_repo}
        failures = finish_after_training(wandb_run, metrics, out, info, status, target if push else None)
        mark_run(out, info, FAILED_AFTER_TRAINING if failures else status, failures)
        if failures:
            raise after_training_error(out, failures)
        logger.info("%s run in %s: %s", status, out, json.dumps(info["metrics"]))


def save_portable_adapter_files(model: Any, out: Path, config: ExperimentConfig) -> None:
    """Make a PEFT run load with plain PEFT / transformers in a process that has never heard of querytune.

    - `config.json`: the base model's config as trained (head size, `id2label`, `label2id`); PEFT's own save leaves
      it out, and the Hub base model's config does not know the run's labels.
    - `adapter_config.json` names the base model by its Hub id: querytune may have loaded it from a local copy
      (the PyPI MiniLM package), whose path means nothing on another machine. querytune's own loader reads the base
      model from `querytune_config.yaml`, so offline loading is unchanged.
    """
    model.get_base_model().config.save_pretrained(out)
    adapter_config = out / "adapter_config.json"
    hub_id = hub_model_id(config.model.model_name_or_path)
    if hub_id and adapter_config.is_file():
        data = json.loads(adapter_config.read_text())
        data["base_model_name_or_path"] = hub_id
        write_json_atomic(adapter_config, data)


def finish_after_training(wandb_run: Any, metrics: dict[str, Any], out: Path, info: dict[str, Any], status: str,
                          push: dict[str, Any] | None) -> list[dict[str, str]]:  # fmt: skip
    """Finish the W&B run, then push (`push`: repo_id, token, private; finished runs only). Failures are returned,
    not raised, so that a network error never costs the trained model on disk."""
    failures: list[dict[str, str]] = []
    try:
        tracking.finish_run(wandb_run, metrics, out, info)
    except Exception as err:  # any W&B failure: the model is saved and the marker says what failed
        logger.error("finishing the W&B run failed: %s: %s", type(err).__name__, err)
        failures.append({"stage": "wandb", "error": f"{type(err).__name__}: {err}"})
    if push and status == FINISHED:
        # The pushed copy carries the marker this run will have if the push succeeds.
        marker = {"status": FAILED_AFTER_TRAINING if failures else FINISHED, **info}
        if failures:
            marker["failures"] = list(failures)
        try:
            metrics["hub_url"] = push_run(out, push["repo_id"], token=push["token"], private=push["private"],
                                          marker=marker)  # fmt: skip
        except PushError as err:
            failures.append({"stage": "hub_push", "error": str(err)})
    return failures


def after_training_error(out: Path, failures: list[dict[str, str]]) -> Exception:
    """One error naming every step that failed after training, and saying the model is safe."""
    detail = " ".join(f["error"] if f["stage"] == "hub_push" else f"Finishing the W&B run failed ({f['error']})."
                      for f in failures)  # fmt: skip
    message = (
        f"{detail} The trained model in {out} is complete; the run is marked {FAILED_AFTER_TRAINING!r} "
        f"(`--allow_status {FAILED_AFTER_TRAINING}` loads it)."
    )
    return PushError(message) if all(f["stage"] == "hub_push" for f in failures) else RunError(message)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `querytune train` and `python -m querytune.train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and not argv[0].startswith("-") else None
    try:
        config = load_config(path, argv)
        run(config)
    except Exception as err:
        problem = distributed_failure(err)
        if problem is None:
            raise
        raise RunError(problem) from err
    return 0


# What the process group's failures say (gloo, NCCL, the TCP store): a peer gone, or one that never came.
_PEER_GONE = ("connection closed by peer", "connection reset", "broken pipe", "socket closed", "nccl error",
              "watchdog caught collective operation timeout", "recv", "send")  # fmt: skip
_NEVER_JOINED = ("clients joined", "timed out", "timeout", "connect")


def distributed_failure(err: BaseException) -> str | None:
    """One line for a failure of the process group in a multi-process run: which rank this is and why (a rank that
    died, a machine that never joined within `ddp_timeout`); None for any other error."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kinds = tuple(getattr(torch.distributed, name) for name in ("DistError", "DistStoreError", "DistNetworkError")
                  if hasattr(torch.distributed, name))  # fmt: skip
    text = str(err).strip()
    lower = text.lower()
    if world < 2 or not (isinstance(err, kinds) or ("gloo" in lower or "nccl" in lower or "store" in lower)):
        return None
    rank, local = os.environ.get("RANK", "?"), os.environ.get("LOCAL_RANK", "?")
    machine = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "?"))
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)[:300]
    if any(word in lower for word in _PEER_GONE) and "clients joined" not in lower:
        why = "another process of the job is gone (killed, or failed: see its log)"
    elif any(word in lower for word in _NEVER_JOINED):
        why = "not every process joined the process group within ddp_timeout (a machine that never started?)"
    else:
        why = "the process group failed"
    return f"rank {rank} of {world} (machine {machine}, local rank {local}): {why}: {type(err).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(run_guarded(main))
