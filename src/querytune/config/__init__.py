"""Experiment files: one YAML per run, parsed into typed dataclasses with command-line overrides.

An experiment file is a flat mapping of keys. Every key belongs to exactly one of `ModelArguments`,
`DataArguments`, `MethodArguments` (`querytune.methods.registry`), a task package's own option dataclass
(`querytune/tasks/<task>/args.py`, e.g. `SlotsArguments`) or 🤗 `TrainingArguments` (through
`QueryTrainingArguments`, which only changes a few defaults). Command-line flags (`--learning_rate 3e-4`) override the file. The YAML and the flags
go through one `HfArgumentParser`, so a YAML value is type-checked exactly like a flag. Unknown keys, bad values
and YAML syntax errors raise `ConfigError` naming the key and the file, before any model is loaded.
"""

from querytune.config.loader import RaisingParser, load_config, read_experiment_file
from querytune.config.schema import (
    UNSEEN_LABELS,
    DataArguments,
    ExperimentConfig,
    ModelArguments,
    QueryTrainingArguments,
    check_split_name,
    sections,
    write_text_atomic,
)
from querytune.errors import ConfigError
from querytune.methods.registry import MethodArguments

__all__ = ["UNSEEN_LABELS", "ConfigError", "DataArguments", "ExperimentConfig", "MethodArguments", "ModelArguments",
           "QueryTrainingArguments", "RaisingParser", "check_split_name", "load_config", "read_experiment_file",
           "sections", "write_text_atomic"]  # fmt: skip
