"""What every task gives the runner: the defaults here, overridden where a task differs.

`train.run` and `inference.LoadedRun` call only these hooks, so a new task (ranking, rewriting, ...) is one new
module plus a registry entry in `querytune.tasks`; it never edits the runner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import EvalPrediction, PreTrainedModel, Trainer

from querytune.config import ExperimentConfig
from querytune.models import load_pretrained


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Item indices in batches of similar length, shortest first, so that inference spends little on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class Task(ABC):
    """One kind of query data: loading, preprocessing, model, trainer, metrics, reports and prediction."""

    model_class: Any  # a transformers Auto class (or one with the same from_pretrained/from_config API)
    peft_task_type: Any  # peft.TaskType, or None where PEFT needs no task type
    default_metric: str  # the metric that decides the best checkpoint when the experiment does not say
    trainer_class: type[Trainer] = Trainer

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.labels: list[str] = []

    # --- data
    @abstractmethod
    def load_data(self) -> DatasetDict:
        """train / validation (and test) splits with a `labels` column; sets the label map."""

    def label_info(self) -> dict[str, Any]:
        """What is saved as label_map.json and restored by `set_label_info` when a run is loaded."""
        return {"labels": self.labels}

    def set_label_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info.get("labels", []))

    @abstractmethod
    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        """Model inputs per split, unpadded (the collator pads per batch)."""

    @abstractmethod
    def collator(self, tokenizer):
        """The data collator that pads a batch."""

    # --- model and trainer
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model_class.from_pretrained` (label maps, head sizes)."""
        return {}

    def load_model(self, name_or_path: str | None = None) -> tuple[PreTrainedModel, list[str]]:
        """The base model (the experiment's, or a saved full fine-tune at `name_or_path`) and its new modules."""
        cfg = self.config.model
        if name_or_path is not None:
            return load_pretrained(self.model_class, name_or_path, **self.model_kwargs())
        return load_pretrained(
            self.model_class, cfg.model_name_or_path, cfg.model_revision, cfg.trust_remote_code, **self.model_kwargs()
        )

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        """Extra keyword arguments for `trainer_class` beyond the ones every task passes."""
        return {}

    # --- metrics and reports
    @abstractmethod
    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """Trainer's metric function on one evaluated split."""

    def write_reports(self, predictions: Any, label_ids: Any, out_dir: Path, split: str) -> None:  # noqa: B027
        """Per-label reports and plots for one evaluated split (nothing by default)."""

    def evaluate_trained(self, trainer: Trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """Score the trained model on one tokenised split at the end of training; write its reports."""
        prefix = "eval" if role == "validation" else "test"
        result = trainer.predict(dataset, metric_key_prefix=prefix)
        if trainer.is_world_process_zero():
            self.write_reports(result.predictions, result.label_ids, out_dir, role)
        return result.metrics

    # --- a loaded run
    @abstractmethod
    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64) -> list[dict[str, Any]]:
        """One JSON-ready result per query (`querytune predict`)."""

    @abstractmethod
    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        """Score a loaded run on one split of `self.config.data`; write the reports (`querytune eval`)."""
