"""Loading query corpora through 🤗 `datasets`: Hub ids, local folders or files, label maps and splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from querytune.config import DataArguments

logger = logging.getLogger(__name__)

DEMO_DATA_DIR = Path(__file__).parent / "demo_data"
# Short names for corpora bundled with the package (written by the querytune authors).
BUNDLED_DATASETS = {"demo-queries": DEMO_DATA_DIR / "queries"}

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                  "val": "validation", "test": "test"}  # fmt: skip


class DataError(ValueError):
    """A problem with the data: the message names the file or dataset, the split, the column or the label."""


def _builder_for(files: list[str]) -> tuple[str, dict[str, Any]]:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise DataError(f"unsupported or mixed file types {sorted(suffixes)} in {files}; use one of {list(_BUILDERS)}")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if ".tsv" in suffixes:
        # GLUE-style TSVs contain bare quote characters: do not treat them as quoting.
        kwargs = {"sep": "\t", "quoting": 3}
    return builder, kwargs


def _discover_split_files(folder: Path) -> dict[str, str]:
    """Map split names to files in a folder by their stem: train.*, validation.* / dev.* / valid.*, test.*."""
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        split = _SPLIT_ALIASES.get(path.stem.lower())
        if split and path.suffix.lower() in _BUILDERS and split not in found:
            found[split] = str(path)
    if "train" not in found:
        raise DataError(f"{folder}: no train file (expected train.jsonl / train.csv / train.tsv / train.parquet)")
    return found


def load_raw(data: DataArguments) -> tuple[DatasetDict, str]:
    """Load all available splits. Returns the splits and a human-readable name of the source."""
    files = {k: v for k, v in (("train", data.train_file), ("validation", data.validation_file),
                               ("test", data.test_file)) if v}  # fmt: skip
    name = data.dataset_name
    if name in BUNDLED_DATASETS:
        name = str(BUNDLED_DATASETS[name])
    if name and Path(name).is_dir():
        files = {**_discover_split_files(Path(name)), **files}
    elif name and Path(name).is_file():
        files = {"train": name, **files}
    if files:
        for split, f in files.items():
            if not Path(f).is_file():
                raise DataError(f"{split} file not found: {f}")
        builder, kwargs = _builder_for(list(files.values()))
        source = name or ", ".join(files.values())
        try:
            raw = datasets.load_dataset(builder, data_files=files, **kwargs)
        except Exception as err:  # the loaders raise many types; the file name is what the user needs
            raise DataError(f"could not read {source}: {type(err).__name__}: {err}") from err
        return raw, source
    try:
        raw = datasets.load_dataset(name, data.dataset_config_name)
    except Exception as err:
        hint = " (offline: point dataset_name at a local folder or set train_file)" if _offline() else ""
        raise DataError(f"could not load dataset {name!r}{hint}: {type(err).__name__}: {err}") from err
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({"train": raw})
    return raw, name


def _renamed(raw: DatasetDict, data: DataArguments) -> DatasetDict:
    for item in data.rename_columns or []:
        old, new = item.split("=")
        raw = DatasetDict({k: ds.rename_column(old, new) if old in ds.column_names else ds for k, ds in raw.items()})
    return raw


def _offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def split_names(data: DataArguments) -> dict[str, str]:
    """Role (train / validation / test) → the dataset's split name for it."""
    wanted = {"train": data.train_split, "validation": data.validation_split}
    if data.test_split:
        wanted["test"] = data.test_split
    return wanted


def present_splits(raw: DatasetDict, wanted: dict[str, str], source: str) -> dict[str, Dataset]:
    """The wanted splits that exist, by role; an empty one is an error."""
    found = {}
    for role, split in wanted.items():
        if split in raw:
            if len(raw[split]) == 0:
                raise DataError(f"{source}: split {split!r} is empty")
            found[role] = raw[split]
    return found


def label_names(train: Dataset, column: str) -> list[str]:
    """The label vocabulary: ClassLabel order when the column has one, else the sorted distinct values."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = set(train.unique(column))
    if None in values:
        raise DataError(f"column {column!r} of the train split has empty (null) labels")
    return [str(v) for v in sorted(values)]


def _check_columns(split: str, ds: Dataset, columns: list[str], source: str) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise DataError(
                f"{source}: split {split!r} has no column {column!r}; it has {ds.column_names}. "
                f"Set text_column / label_column in the experiment file."
            )


def _encode_labels(ds: Dataset, split: str, column: str, labels: list[str], source: str) -> Dataset:
    """Add an integer `labels` column; a label the model has never seen is an error, not a silent -1."""
    feature = ds.features[column]
    as_text = (lambda v: feature.int2str(v)) if isinstance(feature, ClassLabel) else str  # noqa: E731
    label2id = {name: i for i, name in enumerate(labels)}
    distinct = ds.unique(column)
    unseen = sorted({as_text(v) for v in distinct if v is None or as_text(v) not in label2id})
    if unseen:
        raise DataError(
            f"{source}: split {split!r} has label(s) {unseen[:10]} in column {column!r} that do not occur in the "
            f"train split ({len(labels)} labels known)"
        )
    lookup = {v: label2id[as_text(v)] for v in distinct}
    ds = ds.map(lambda batch: {"labels": [lookup[v] for v in batch[column]]}, batched=True, desc=f"labels {split}")
    return ds.cast_column("labels", ClassLabel(names=labels))


def load_classification_splits(data: DataArguments, seed: int) -> tuple[DatasetDict, list[str]]:
    """Train / validation / (test) splits with an integer `labels` ClassLabel column, and the label names.

    The label map comes from the whole train split, before any `max_*_samples` subsetting, so it does not depend
    on the sample size. Without a validation split, a seeded (stratified when possible) one is carved from train.
    """
    raw, source = load_raw(data)
    raw = _renamed(raw, data)
    if data.train_split not in raw:
        raise DataError(f"{source}: no split {data.train_split!r}; it has {list(raw)}")
    columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
    wanted = split_names(data)
    splits: dict[str, Dataset] = {}
    for role, ds in present_splits(raw, wanted, source).items():
        _check_columns(wanted[role], ds, columns, source)
        splits[role] = ds
    labels = label_names(splits["train"], data.label_column)
    if len(labels) < 2:
        raise DataError(f"{source}: column {data.label_column!r} has {len(labels)} distinct label(s); need >= 2")
    if data.oos_label is not None and data.oos_label not in labels:
        raise DataError(f"{source}: oos_label {data.oos_label!r} is not a label of column {data.label_column!r}")
    for role in list(splits):
        splits[role] = _encode_labels(splits[role], wanted[role], data.label_column, labels, source)

    return DatasetDict(finish_splits(splits, data, seed)), labels


def finish_splits(splits: dict[str, Dataset], data: DataArguments, seed: int, stratify: bool = True) -> dict:
    """Carve a seeded validation split from train when there is none, then apply max_train/eval_samples."""
    if "validation" not in splits:
        splits["train"], splits["validation"] = _carve_validation(
            splits["train"], data.validation_split_percentage, seed, stratify
        )
        logger.info("no %r split: held out %d train rows as validation (seed %d)", data.validation_split,
                    len(splits["validation"]), seed)  # fmt: skip
    if data.max_train_samples:
        splits["train"] = _sample(splits["train"], data.max_train_samples, seed)
    if data.max_eval_samples:
        for role in ("validation", "test"):
            if role in splits:
                splits[role] = _sample(splits[role], data.max_eval_samples, seed)
    return splits


def _carve_validation(train: Dataset, percentage: float, seed: int, stratify: bool = True) -> tuple[Dataset, Dataset]:
    column = None
    if stratify:
        counts = train.to_pandas()["labels"].value_counts()
        n_val = round(len(train) * percentage / 100)
        # Stratify when every class can appear on both sides; tiny corpora fall back to a plain seeded split.
        column = "labels" if counts.min() >= 2 and len(counts) <= n_val <= len(train) - len(counts) else None
    parts = train.train_test_split(test_size=percentage / 100, seed=seed, stratify_by_column=column)
    return parts["train"], parts["test"]


def _sample(ds: Dataset, n: int, seed: int) -> Dataset:
    """A seeded random sample: corpora are often sorted by label, so the first N rows would be a few classes."""
    return ds if n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def load_one_split(data: DataArguments, split: str) -> tuple[Dataset, str]:
    """One non-empty split of any dataset (columns renamed as configured) and the source's name, for re-scoring."""
    raw, source = load_raw(data)
    raw = _renamed(raw, data)
    if split not in raw:
        raise DataError(f"{source}: no split {split!r}; it has {list(raw)}")
    if len(raw[split]) == 0:
        raise DataError(f"{source}: split {split!r} is empty")
    return raw[split], source


def load_eval_split(data: DataArguments, split: str, labels: list[str]) -> Dataset:
    """One split of any dataset, encoded with a trained run's label map (unknown labels are an error)."""
    ds, source = load_one_split(data, split)
    columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
    _check_columns(split, ds, columns, source)
    ds = _encode_labels(ds, split, data.label_column, labels, source)
    return _sample(ds, data.max_eval_samples, 0) if data.max_eval_samples else ds
