"""The Task contract: everything that differs from one kind of query data to another, as hooks and attributes.

`train.run`, the run loader (`querytune.inference`), `querytune export` / `serve`, the Hub card and `querytune
report` call only these hooks and read only these attributes; none of them branches on a task's name or class.
A new task is one package under `querytune/tasks/` whose `Task` subclass fills them in, plus one `register_task`
call (see CONTRIBUTING.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from datasets import DatasetDict
from transformers import EvalPrediction, PreTrainedModel, Trainer

from querytune.config import ExperimentConfig
from querytune.methods.registry import check_supports
from querytune.models import load_pretrained
from querytune.tasks import TaskInput


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Item indices in batches of similar length, shortest first, so that inference spends little on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def check_head_labels(name_or_path: str, id2label: dict[int, str] | None) -> None:
    """Refuse a local checkpoint whose trained head has this task's labels in another order.

    Starting from a fine-tuned run (a student from its teacher, `model_name_or_path: runs/...`) reuses its head, row
    for row; `id2label` only renames the rows, so a different label order would silently misalign every class.
    """
    config_file = Path(name_or_path) / "config.json"
    if not id2label or not config_file.is_file():
        return
    import json

    saved = json.loads(config_file.read_text()).get("id2label") or {}
    theirs = [saved[k] for k in sorted(saved, key=int)]
    ours = [id2label[i] for i in sorted(id2label)]
    if sorted(theirs) == sorted(ours) and theirs != ours:
        first = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        raise ValueError(
            f"model_name_or_path {name_or_path}: its classification head was trained on the same labels in another "
            f"order (row {first} is {theirs[first]!r} there, {ours[first]!r} here); load the data so that the "
            "labels come out in the checkpoint's order, or start from its base model"
        )


# PEFT's Auto class for each PEFT task type (peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING, by name).
_PEFT_AUTO_CLASSES = {
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


class Task(ABC):
    """One kind of query data: loading, preprocessing, model, trainer, metrics, reports, prediction and export."""

    model_class: Any  # a transformers Auto class (or one with the same from_pretrained/from_config API)
    peft_task_type: Any  # peft.TaskType, or None where PEFT needs no task type
    default_metric: str  # the metric that decides the best checkpoint when the experiment does not say
    trainer_class: type[Trainer] = Trainer
    arguments: ClassVar[type | None] = None  # the task's own option dataclass (flat experiment keys), if any
    # What methods may need of a task registered by class (`register_task` takes it for a class given by path):
    # {"encoder"} is an encoder with a head, which freezing the body and bottleneck adapters need.
    offers: ClassVar[frozenset[str]] = frozenset()

    # --- how other tools see a run of this task
    pipeline_tag: ClassVar[str] = "text-classification"  # the Hub card's pipeline_tag
    card_tags: ClassVar[tuple[str, ...]] = ()  # extra Hub tags
    # Metrics the card shows: metric name (without split prefix) -> (model-index metric type, display name, the
    # factor the card's table shows it with: 100 for a fraction shown in %).
    card_metrics: ClassVar[dict[str, tuple[str, str, float]]] = {}
    # Columns of `querytune report`: (metric name without split prefix, header, scale).
    report_columns: ClassVar[list[tuple[str, str, float]]] = []
    # A column left out where the run has a more specific metric, e.g. {"accuracy": "in_scope_accuracy"}.
    report_shadowed: ClassVar[dict[str, str]] = {}
    # Inputs besides the queries that `predict` takes: the `querytune predict` flags and `POST /predict` fields are
    # generated from them (rerank's candidates, retrieval's catalogue). Give the same tuple to `register_task`.
    request_inputs: ClassVar[tuple[TaskInput, ...]] = ()
    default_top_k: ClassVar[int] = 3  # `predict` without --top_k
    # Knowledge distillation (`distill_teacher`, querytune.distill): the output whose teacher logits the student
    # learns from (a name of `verification_outputs`), or None where the task does not support it.
    distill_output: ClassVar[str | None] = None
    # `student_layers` applies: the task builds its model with `Task.load_model` (False where it loads its own way).
    layer_dropping: ClassVar[bool] = True

    @classmethod
    def card_info(cls, label_info: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """The Hub card's pipeline tag and extra tags for a run with this saved label map."""
        return cls.pipeline_tag, cls.card_tags

    @classmethod
    def auto_classes(cls, label_info: dict[str, Any]) -> tuple[str, str] | None:
        """The transformers and PEFT Auto classes that load a run of this task without querytune (the Hub card's
        snippet), or None when the model class is querytune's own (e.g. the joint intent + slots model)."""
        model_class = getattr(cls, "model_class", None)
        if model_class is None or not getattr(model_class, "__module__", "").startswith("transformers"):
            return None
        task_type = getattr(cls.peft_task_type, "value", cls.peft_task_type)
        peft_class = _PEFT_AUTO_CLASSES.get(task_type)
        return (model_class.__name__, peft_class) if peft_class else None

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.args = config.task_args  # an instance of `arguments`, or None
        self.labels: list[str] = []
        check_supports(config.method.method, config.data.task)  # a config built in code is checked here too
        if config.distill.distill_teacher and self.distill_output is None:
            raise ValueError(f"task {config.data.task!r} does not support distill_teacher")
        if config.model.student_layers and not self.layer_dropping:
            raise ValueError(f"task {config.data.task!r} does not support student_layers")

    # --- data
    @abstractmethod
    def load_data(self) -> DatasetDict:
        """train / validation (and test) splits with a `labels` column; sets the label map."""

    def distill_labels(self) -> list[str]:
        """The class names of `distill_output`, in the order of its logits (to line a teacher's up with them)."""
        return self.labels

    def label_info(self) -> dict[str, Any]:
        """What is saved as label_map.json and restored by `set_label_info` when a run is loaded."""
        return {"labels": self.labels}

    def set_label_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info.get("labels", []))

    def run_files(self, out_dir: Path) -> list[str]:
        """Files a finished run carries besides the model, so that it loads from any directory or machine (a
        retrieval run's catalogue); written at the end of training. Their names."""
        return []

    @classmethod
    def card_notes(cls, run_dir: Path) -> str:
        """Markdown the Hub card adds for a run of this task (what it carries and how a teammate uses it)."""
        return ""

    def loaded_from(self, run_dir: Path) -> None:  # noqa: B027
        """Called when a saved run or export is loaded (after `set_label_info`): read what `run_files` carried."""

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
        if name_or_path is not None:  # a saved run: its code is trusted only when the loader was told so
            return load_pretrained(self.model_class, name_or_path, trust_remote_code=cfg.trust_remote_code,
                                   **self.model_kwargs())  # fmt: skip
        kwargs = self.model_kwargs()
        check_head_labels(cfg.model_name_or_path, kwargs.get("id2label"))
        model, new_modules = load_pretrained(
            self.model_class, cfg.model_name_or_path, cfg.model_revision, cfg.trust_remote_code, **kwargs
        )
        if cfg.student_layers:  # a saved run already has only the kept layers: dropped here, at the base only
            from querytune.distill import keep_layers

            keep_layers(model, cfg.student_layers)
        return model, new_modules

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
    def logits(self, run, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> Any:
        """One row of class scores per query (or text pair), for tasks whose model answers with one (a teacher's
        logits, `LoadedRun.logits`)."""
        raise NotImplementedError(f"a {self.config.data.task} run gives no per-query logits")

    def metadata(self) -> dict[str, Any]:
        """What `GET /metadata` says about a loaded run of this task besides its labels (the joint task's intents)."""
        return {}

    @abstractmethod
    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64, **inputs) -> list[dict[str, Any]]:
        """One JSON-ready result per query (`querytune predict`); `inputs` are the task's `request_inputs`."""

    @abstractmethod
    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        """Score a loaded run on one split of `self.config.data`; write the reports (`querytune eval`)."""

    # --- augmentation of the train split (`augment`, querytune.augment)
    def augment_unsupported(self) -> str | None:
        """Why this task's train rows cannot be augmented (one line), or None when they can."""
        return f"task {self.config.data.task!r} does not support augmentation"

    def augment_examples(self, split) -> list:
        """The rows of one split as augmenter `Example`s (words, label, and tags on slot corpora); `source` is the
        row's index."""
        raise NotImplementedError(self.augment_unsupported() or "augment_examples")

    def augmented_train(self, train, examples: list) -> Any:
        """The train split with one row appended per example (other columns copied from its source row)."""
        raise NotImplementedError(self.augment_unsupported() or "augmented_train")

    def augment_agreement(self, run, examples: list) -> list[bool]:
        """This loaded run as a consistency filter (`augment_filter_run`): does it predict each example's label (and,
        on slot corpora, its spans)? An example whose label the run does not know is a `ConfigError`."""
        raise NotImplementedError(f"a {self.config.data.task} run cannot filter augmented rows")

    # --- search (`POST /search`): runs that rank a catalogue of their own for a query
    def search_unsupported(self) -> str | None:
        """Why this run cannot search a catalogue (one line), or None when it can."""
        return f"a {self.config.data.task} run does not search a catalogue"

    def prepare_search(self, run) -> None:  # noqa: B027
        """Load what `search` needs (catalogue, embeddings, indexes) before the server takes requests."""

    def search(self, run, queries: list[str], top_k: int = 10, batch_size: int = 64) -> list[dict[str, Any]]:
        """Per query: {"query", "mode", "hits": [{"rank", "id", "title", "score"}, ...]}, best first."""
        raise NotImplementedError(self.search_unsupported() or "search")

    # --- export (`querytune export`): what is verified against the PyTorch run
    def export_unsupported(self) -> str | None:
        """Why runs of this task cannot be exported (one line), or None when they can."""
        return None

    def export_files(self, run, out_dir: Path) -> list[str]:
        """Files besides the model that an export of this run serves with (written into `out_dir`); their names."""
        return []

    def verification_texts(self, run, split: str) -> tuple[list[str], list[str] | None]:
        """The queries (and text pairs) of one held-out split, to compare an export with the run."""
        raise NotImplementedError

    # Verification compares whole groups (e.g. a query's documents), so it keeps the split's first rows rather than
    # a random sample, and top-1 means the best row of each group.
    verification_grouped: ClassVar[bool] = False

    def verification_outputs(self, run, texts: list[str], pairs: list[str] | None,
                             batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
        """Per-query outputs by name (e.g. `logits`), read as `predict` reads them, for the export check."""
        raise NotImplementedError
