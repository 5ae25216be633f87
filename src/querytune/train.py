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
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def peak_memory_mb() -> tuple[float, str]:
    """Peak accelerator memory allocated by torch, or this process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
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
    args = config.training
    setup_logging(config)
    started = time.time()
    args.output_dir = sweep_output_dir(args.output_dir)
    out = Path(args.output_dir)

    # --- run directory and resume
    resume = args.resume_from_checkpoint
    if resume == "last" and last_complete_checkpoint(out) is None:
        raise RunError(f"--resume_from_checkpoint last: no complete checkpoint-* folder in {out}")
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise RunError(f"--resume_from_checkpoint: checkpoint folder not found: {resume}")
    if args.should_save:
        prepare_output_dir(out, resume=resume is not None, overwrite=args.overwrite_output_dir)
        # Written before anything else, so that the resume hint works for a run killed at any point.
        config.save(out / CONFIG_FILE)
    set_seed(args.seed)
    check_distributed(config)

    # --- data
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

    # --- model and method
    steps_per_epoch = math.ceil(
        len(encoded["train"]) / (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps)
    )
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    check_steps(total_steps, len(encoded["train"]), config)
    if args.max_steps <= 0 and args.min_train_steps and total_steps < args.min_train_steps:
        # exactly the floor (the last epoch may be partial), so that sets of different sizes under it get equal steps
        logger.info("min_train_steps %d: %d train rows make %d steps in %g epochs; training %d steps (%.1f epochs)",
                    args.min_train_steps, len(encoded["train"]), total_steps, args.num_train_epochs,
                    args.min_train_steps, args.min_train_steps / steps_per_epoch)  # fmt: skip
        args.max_steps = total_steps = args.min_train_steps
        args.num_train_epochs = args.min_train_steps / steps_per_epoch
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

    # --- trainer
    if args.metric_for_best_model is None and args.load_best_model_at_end:
        args.metric_for_best_model = task.default_metric
        args.greater_is_better = True
    throughput = ThroughputCallback()
    method_cbs = method_callbacks(model, config.method)
    callbacks = [throughput, *method_cbs, *(callbacks or [])]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    if resume == "last":  # the newest checkpoint holding everything Trainer and the method's callbacks wrote
        needed = tuple(f for cb in method_cbs for f in getattr(cb, "checkpoint_files", ()))
        resume = last_complete_checkpoint(out, needed)
        if resume is None:
            raise RunError(f"--resume_from_checkpoint last: no complete checkpoint-* folder in {out}")
        resume = str(resume)
        logger.info("resuming from %s", resume)
    for cb in method_cbs:
        if hasattr(cb, "resume_from"):
            cb.resume_from = resume
    # querytune pushes the finished run itself (card, label map, no checkpoints); Trainer must not push, and the
    # token must not reach training_args.bin, which Trainer pickles into every checkpoint.
    push, hub_token = args.push_to_hub, args.hub_token
    args.push_to_hub, args.hub_token = False, None
    wandb_run = tracking.start_run(config)
    trainer = task.trainer_class(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer),
        compute_metrics=task.compute_metrics,
        callbacks=callbacks,
        **task.trainer_kwargs(tokenizer),
    )

    # --- train
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    status = PRUNED if any(getattr(cb, "pruned", False) for cb in callbacks) else FINISHED
    metrics: dict[str, Any] = {f"train_{k}" if not k.startswith("train") else k: v
                               for k, v in train_result.metrics.items()}  # fmt: skip
    metrics["train_step_samples_per_second"] = throughput.samples_per_second(args)
    metrics["peak_memory_mb"], memory_kind = peak_memory_mb()
    metrics["world_size"] = args.world_size
    metrics |= augment_counts | {"train_rows": len(encoded["train"]), "schedule_epochs": args.num_train_epochs,
                                 "schedule_steps": total_steps}  # fmt: skip

    # --- evaluate
    for role in ("validation", "test"):
        if role not in encoded:
            continue
        metrics.update(task.evaluate_trained(trainer, encoded[role], role, out))

    # --- save (main process only), card, W&B, Hub, marker last
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        if get_method(config.method.method).peft:
            save_portable_adapter_files(trainer.model, out, config)
        args.push_to_hub = push  # the saved config is what the user asked for
        config.save(out / CONFIG_FILE)
        write_json_atomic(out / LABEL_MAP, task.label_info())
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
            "peak_memory_kind": memory_kind,
            "global_step": trainer.state.global_step,
            "wall_time_s": time.time() - started,
            "weights": [p.name for p in weights],
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("eval_", "test_"))},
        }
        if augment_counts or config.data.max_train_samples_per_label:
            info["training_data"] = {"max_train_samples_per_label": config.data.max_train_samples_per_label,
                                     "augment": config.augment.augment, **augment_counts}  # fmt: skip
        write_model_card(out, info)
        hub = {"repo_id": args.hub_model_id or out.name, "token": hub_token, "private": args.hub_private_repo}
        failures = finish_after_training(wandb_run, metrics, out, info, status, hub if push else None)
        mark_run(out, info, FAILED_AFTER_TRAINING if failures else status, failures)
        if failures:
            raise after_training_error(out, failures)
        logger.info("%s run in %s: %s", status, out, json.dumps(info["metrics"]))
    return RunResult(metrics=metrics, model=trainer.model, tokenizer=tokenizer, trainer=trainer, output_dir=out,
                     status=status)  # fmt: skip


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
    config = load_config(path, argv)
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
