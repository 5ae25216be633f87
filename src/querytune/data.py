"""Loading query corpora through 🤗 `datasets`, for every task: sources, splits by role, labels, group splits, samples.

Each task package turns what these helpers load into its own examples; they never re-implement them:

- `load_splits`: the train / validation / test splits of a Hub id, a local folder or files, by role, columns renamed.
- `label_names` / `encode_labels`: a label map from the train split, and integer labels checked against it
  (`UnseenLabels`: what `unseen_labels` does with eval/test labels that train lacks).
- `finish_splits`: a seeded (stratified) validation split carved from train when there is none, then sampling.
- `split_groups`: one rule for splits that must keep a group (a conversation, a query) on one side.
- `sample` / `sample_indices`: one seeded sampler for rows, queries or any list.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from querytune.config import DataArguments
from querytune.errors import DataError

__all__ = ["UNSEEN_ID", "DataError", "UnseenLabels", "builder_for", "carve_validation", "check_columns",
           "append_rows", "column_strings", "discover_split_files", "encode_labels", "finish_splits", "hash_bucket", "is_unseen", "label_names",
           "load_one_split", "load_raw", "load_splits", "local_files", "present_splits", "rename_columns", "sample",
           "sample_indices", "sample_per_label", "split_groups", "split_names", "unseen_labels_error"]  # fmt: skip

logger = logging.getLogger(__name__)

DEMO_DATA_DIR = Path(__file__).parent / "demo_data"
# Short names for corpora bundled with the package (written by the querytune authors).
BUNDLED_DATASETS = {"demo-queries": DEMO_DATA_DIR / "queries"}

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                  "val": "validation", "test": "test"}  # fmt: skip


# --- sources
def builder_for(files: list[str]) -> tuple[str, dict[str, Any]]:
    """The `datasets` builder (json / csv / parquet) and its options for a list of local files of one type."""
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


def discover_split_files(folder: Path) -> dict[str, str]:
    """Map split names to files in a folder by their stem: train.*, validation.* / dev.* / valid.*, test.*."""
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        split = _SPLIT_ALIASES.get(path.stem.lower())
        if split and path.suffix.lower() in _BUILDERS and split not in found:
            found[split] = str(path)
    if "train" not in found:
        raise DataError(f"{folder}: no train file (expected train.jsonl / train.csv / train.tsv / train.parquet)")
    return found


def local_files(data: DataArguments) -> dict[str, str]:
    """Split → local file, from `dataset_name` (a folder, a file or a bundled corpus) and `*_file` (empty for a Hub
    dataset)."""
    files = {k: v for k, v in (("train", data.train_file), ("validation", data.validation_file),
                               ("test", data.test_file)) if v}  # fmt: skip
    name = data.dataset_name
    if name in BUNDLED_DATASETS:
        name = str(BUNDLED_DATASETS[name])
    if name and Path(name).is_dir():
        files = {**discover_split_files(Path(name)), **files}
    elif name and Path(name).is_file():
        files = {"train": name, **files}
    return files


def load_raw(data: DataArguments) -> tuple[DatasetDict, str]:
    """Load all available splits. Returns the splits and a human-readable name of the source.

    Local csv / tsv files are read with `csv_encoding` when it is set; a file that is not UTF-8 is an error that
    says to set it.
    """
    files = local_files(data)
    if files:
        for split, f in files.items():
            if not Path(f).is_file():
                raise DataError(f"{split} file not found: {f}")
        builder, kwargs = builder_for(list(files.values()))
        if data.csv_encoding and builder == "csv":
            kwargs["encoding"] = data.csv_encoding
        source = data.dataset_name or ", ".join(files.values())
        try:
            raw = datasets.load_dataset(builder, data_files=files, **kwargs)
        except Exception as err:  # the loaders raise many types; the file name is what the user needs
            hint = "; the file is not UTF-8: set csv_encoding (e.g. latin-1)" if _decode_error(err) else ""
            raise DataError(f"could not read {source}: {type(err).__name__}: {err}{hint}") from err
        return raw, source
    name = data.dataset_name
    try:
        raw = datasets.load_dataset(name, data.dataset_config_name)
    except Exception as err:
        hint = " (offline: point dataset_name at a local folder or set train_file)" if _offline() else ""
        raise DataError(f"could not load dataset {name!r}{hint}: {type(err).__name__}: {err}") from err
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({"train": raw})
    return raw, name


def _decode_error(err: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, UnicodeDecodeError) or "codec can't decode" in str(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def rename_columns(raw: DatasetDict, data: DataArguments) -> DatasetDict:
    """Apply `rename_columns` (OLD=NEW) to every split that has OLD."""
    for item in data.rename_columns or []:
        old, new = item.split("=")
        raw = DatasetDict({k: ds.rename_column(old, new) if old in ds.column_names else ds for k, ds in raw.items()})
    return raw


def _offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


# --- splits by role
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


def load_splits(data: DataArguments) -> tuple[dict[str, Dataset], dict[str, str], str]:
    """The dataset's splits by role (columns renamed), the role → split-name map, and the source's name.

    A missing train split is an error; validation and test may be missing (the tasks carve or skip them).
    """
    raw, source = load_raw(data)
    raw = rename_columns(raw, data)
    if data.train_split not in raw:
        raise DataError(f"{source}: no split {data.train_split!r}; it has {list(raw)}")
    wanted = split_names(data)
    return present_splits(raw, wanted, source), wanted, source


def load_one_split(data: DataArguments, split: str) -> tuple[Dataset, str]:
    """One non-empty split of any dataset (columns renamed as configured) and the source's name, for re-scoring."""
    raw, source = load_raw(data)
    raw = rename_columns(raw, data)
    if split not in raw:
        raise DataError(f"{source}: no split {split!r}; it has {list(raw)}")
    if len(raw[split]) == 0:
        raise DataError(f"{source}: split {split!r} is empty")
    return raw[split], source


def check_columns(split: str, ds: Dataset, columns: Iterable[str], source: str,
                  hint: str = "Set text_column / label_column in the experiment file.") -> None:  # fmt: skip
    """Every column is present, or an error naming the split, the column and the columns there are."""
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"{source}: split {split!r} has no column {column!r}; it has {ds.column_names}. {hint}")


# --- labels
def label_names(train: Dataset, column: str) -> list[str]:
    """The label vocabulary: ClassLabel order when the column has one, else the sorted distinct values."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = set(train.unique(column))
    if None in values:
        raise DataError(f"column {column!r} of the train split has empty (null) labels")
    return [str(v) for v in sorted(values)]


# An eval/test label the train split lacks, kept with `unseen_labels: as_wrong`: the k-th such label gets the id
# UNSEEN_ID - k. Every such id is below -100, so no prediction can equal it, and the tasks' Trainer turns it into -100
# for the loss; metrics count those rows as wrong, as JointBERT's published evaluation does with its UNK label.
UNSEEN_ID = -101


@dataclass
class UnseenLabels:
    """`DataArguments.unseen_labels` applied to a task's eval/test splits: the ids given to unseen labels kept as
    wrong, and per split role the rows dropped (`drop`) or kept with an unseen label (`as_wrong`)."""

    policy: str = "error"
    ids: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def id_of(self, name: str) -> int:
        return self.ids.setdefault(name, UNSEEN_ID - len(self.ids))

    def name_of(self, label_id: int) -> str:
        return next(name for name, i in self.ids.items() if i == label_id)

    def metrics(self, role: str) -> dict[str, int]:
        """What the metrics of one split say about it: `num_dropped_unseen` or `num_unseen_as_wrong`."""
        if self.policy == "drop":
            return {"num_dropped_unseen": self.counts.get(role, 0)}
        if self.policy == "as_wrong":
            return {"num_unseen_as_wrong": self.counts.get(role, 0)}
        return {}


def is_unseen(label_id: int) -> bool:
    return label_id <= UNSEEN_ID


def unseen_labels_error(source: str, split: str, what: str, column: str, unseen: list[str], known: str) -> DataError:
    """The `unseen_labels: error` message: what the split holds that train lacks, and the option that allows it."""
    return DataError(
        f"{source}: split {split!r} has {what} {unseen[:10]}{' ...' if len(unseen) > 10 else ''} in column {column!r} "
        f"that do not occur in the train split ({known}). Set unseen_labels: as_wrong to keep those rows and score "
        "them as errors, or unseen_labels: drop to leave them out (counted as num_dropped_unseen)"
    )


def encode_labels(ds: Dataset, split: str, column: str, labels: list[str], source: str,
                  unseen: UnseenLabels | None = None, role: str | None = None) -> Dataset:  # fmt: skip
    """Add an integer `labels` column; a label the model has never seen is an error, not a silent -1.

    For eval/test splits, `unseen` (the task's `UnseenLabels`, one per label column) may allow such labels:
    `as_wrong` keeps the rows with an id below -100, `drop` removes them and counts them under `role`. The train
    split defines the label map and is never given one.
    """
    feature = ds.features[column]
    as_text = (lambda v: feature.int2str(v)) if isinstance(feature, ClassLabel) else str  # noqa: E731
    label2id = {name: i for i, name in enumerate(labels)}
    distinct = ds.unique(column)
    if None in distinct:
        raise DataError(f"{source}: split {split!r} has empty (null) labels in column {column!r}")
    missing = sorted({as_text(v) for v in distinct if as_text(v) not in label2id})
    policy = unseen.policy if unseen is not None else "error"
    if missing and policy == "error":
        raise unseen_labels_error(source, split, "label(s)", column, missing, f"{len(labels)} labels known")
    if missing and policy == "drop":
        gone = set(missing)
        before = len(ds)
        ds = ds.filter(lambda batch: [as_text(v) not in gone for v in batch[column]], batched=True,
                       desc=f"dropping unseen labels {split}")  # fmt: skip
        if len(ds) == 0:
            raise DataError(f"{source}: split {split!r}: every row has a label the train split lacks ({missing[:10]})")
        unseen.counts[role or split] = unseen.counts.get(role or split, 0) + before - len(ds)
        distinct = ds.unique(column)
        missing = []
    lookup = {v: label2id[as_text(v)] if as_text(v) in label2id else unseen.id_of(as_text(v)) for v in distinct}
    ds = ds.map(lambda batch: {"labels": [lookup[v] for v in batch[column]]}, batched=True, desc=f"labels {split}")
    if missing:  # as_wrong: ids below -100 are no ClassLabel values
        logger.warning("%s: split %r: %d rows have labels the train split lacks (%s); kept and scored as wrong "
                       "(unseen_labels: as_wrong)", source, split, sum(1 for i in ds["labels"] if is_unseen(i)),
                       missing[:10])  # fmt: skip
        return ds
    return ds.cast_column("labels", ClassLabel(names=labels))


# --- carving and sampling
def finish_splits(splits: dict[str, Dataset], data: DataArguments, seed: int, stratify: bool = True,
                  label_column: str | None = "labels") -> dict:  # fmt: skip
    """Carve a seeded validation split from train when there is none, then apply max_train_samples_per_label (by
    `label_column`; rows when it is None or absent) and max_train/eval_samples.

    The validation split is carved first, so it is the same whatever the per-label sample size."""
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve_validation(
            splits["train"], data.validation_split_percentage, seed, stratify
        )
        logger.info("no %r split: held out %d train rows as validation (seed %d)", data.validation_split,
                    len(splits["validation"]), seed)  # fmt: skip
    if data.max_train_samples_per_label:
        before = len(splits["train"])
        splits["train"] = sample_per_label(splits["train"], label_column, data.max_train_samples_per_label, seed)
        logger.info("max_train_samples_per_label %d: kept %d of %d train rows (seed %d)",
                    data.max_train_samples_per_label, len(splits["train"]), before, seed)  # fmt: skip
    if data.max_train_samples:
        splits["train"] = sample(splits["train"], data.max_train_samples, seed)
    if data.max_eval_samples:
        for role in ("validation", "test"):
            if role in splits:
                splits[role] = sample(splits[role], data.max_eval_samples, seed)
    return splits


def carve_validation(train: Dataset, percentage: float, seed: int, stratify: bool = True) -> tuple[Dataset, Dataset]:
    """A seeded row split of train, stratified by `labels` when every class can appear on both sides.

    Rows, not groups: for data whose rows belong to groups (a conversation, a query), use `split_groups`.
    """
    column = None
    if stratify:
        counts = train.to_pandas()["labels"].value_counts()
        n_val = round(len(train) * percentage / 100)
        # Stratify when every class can appear on both sides; tiny corpora fall back to a plain seeded split.
        column = "labels" if counts.min() >= 2 and len(counts) <= n_val <= len(train) - len(counts) else None
    parts = train.train_test_split(test_size=percentage / 100, seed=seed, stratify_by_column=column)
    return parts["train"], parts["test"]


def sample_indices(total: int, n: int | None, seed: int) -> list[int]:
    """A seeded sample of n of range(total), in increasing order (all of them when n is None or larger)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def sample_per_label(ds: Dataset, column: str | None, n: int, seed: int) -> Dataset:
    """At most n rows of each value of `column`, in their original order (n rows in all when the column is None or
    absent). Each label's rows are shuffled by a seed of its own and the first n kept, so the sample of one label
    does not depend on the others, and a smaller n keeps a subset of a larger one (nested samples)."""
    if column is None or column not in ds.column_names:
        logger.info("max_train_samples_per_label: no label column %r in train: sampling %d rows", column, n)
        return sample(ds, n, seed)
    groups: dict[Any, list[int]] = {}
    for i, value in enumerate(ds[column]):
        groups.setdefault(value, []).append(i)
    keep: list[int] = []
    for value, rows in groups.items():
        random.Random(f"{seed}:{value}").shuffle(rows)
        keep += rows[:n]
    return ds.select(sorted(keep)) if len(keep) < len(ds) else ds


def sample(items: Dataset | Sequence, n: int | None, seed: int):
    """A seeded random sample of n rows of a Dataset or items of a list, in their original order.

    Corpora are often sorted by label, so the first N rows would be a few classes; the sample depends only on the
    seed and the number of items.
    """
    keep = sample_indices(len(items), n, seed)
    if len(keep) == len(items):
        return items
    return items.select(keep) if isinstance(items, Dataset) else [items[i] for i in keep]


def column_strings(ds: Dataset, column: str) -> list[str]:
    """A column's values as strings (ClassLabel ids as their names)."""
    feature = ds.features[column]
    if isinstance(feature, ClassLabel):
        return [feature.int2str(v) for v in ds[column]]
    return ["" if v is None else str(v) for v in ds[column]]


def append_rows(ds: Dataset, rows: list[dict[str, Any]]) -> Dataset:
    """`ds` with `rows` (dicts with every column of `ds`) appended, typed by `ds`'s features."""
    if not rows:
        return ds
    return datasets.concatenate_datasets([ds, Dataset.from_list(rows, features=ds.features)])


def hash_bucket(key: str, seed: int = 0) -> float:
    """A key's place in [0, 100) under the seeded md5 rule: `int(md5(f"{seed}:{key}"), 16) % 10000 / 100`."""
    digest = hashlib.md5(f"{seed}:{key}".encode()).hexdigest()
    return int(digest, 16) % 10000 / 100


def split_groups(keys: Iterable[str], test_percentage: float, validation_percentage: float, seed: int,
                 rule: str = "hash") -> dict[str, str]:  # fmt: skip
    """Group key → role ("train", "validation" or "test"), so that every row of a group lands in one split.

    - `hash`: the key's md5 bucket (`hash_bucket`): below `test_percentage` is test, the next
      `validation_percentage` points validation. A key's role never depends on the other keys, so adding data never
      moves a query from train to test. Relevance data uses it.
    - `shuffle`: the sorted distinct keys in a seeded random order, the first `test_percentage` % test and the next
      `validation_percentage` % validation: exact shares, which small corpora need (conversations for rewriting).
    """
    distinct = sorted(set(keys))
    if rule == "hash":
        roles = {}
        for key in distinct:
            bucket = hash_bucket(key, seed)
            roles[key] = ("test" if bucket < test_percentage
                          else "validation" if bucket < test_percentage + validation_percentage else "train")  # fmt: skip
        return roles
    if rule != "shuffle":
        raise ValueError(f"split_groups: rule must be 'hash' or 'shuffle', got {rule!r}")
    random.Random(seed).shuffle(distinct)
    n_test = round(len(distinct) * test_percentage / 100)
    n_val = round(len(distinct) * validation_percentage / 100)
    if len(distinct) - n_test - n_val < 1 or (validation_percentage and n_val < 1):
        raise DataError(f"{len(distinct)} groups are too few for {validation_percentage}% validation and "
                        f"{test_percentage}% test")  # fmt: skip
    roles = dict.fromkeys(distinct, "train")
    roles.update(dict.fromkeys(distinct[:n_test], "test"))
    roles.update(dict.fromkeys(distinct[n_test : n_test + n_val], "validation"))
    return roles
