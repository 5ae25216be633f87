"""Classification data: queries (or text pairs) with one label each, from any source `querytune.data` loads."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from querytune.config import DataArguments
from querytune.data import (
    DataError,
    check_columns,
    encode_labels,
    finish_splits,
    label_names,
    load_one_split,
    load_splits,
    sample,
)


def _columns(data: DataArguments) -> list[str]:
    return [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])


def load_classification_splits(data: DataArguments, seed: int) -> tuple[DatasetDict, list[str]]:
    """Train / validation / (test) splits with an integer `labels` ClassLabel column, and the label names.

    The label map comes from the whole train split, before any `max_*_samples` subsetting, so it does not depend
    on the sample size. Without a validation split, a seeded (stratified when possible) one is carved from train.
    """
    found, wanted, source = load_splits(data)
    splits: dict[str, Dataset] = {}
    for role, ds in found.items():
        check_columns(wanted[role], ds, _columns(data), source)
        splits[role] = ds
    labels = label_names(splits["train"], data.label_column)
    if len(labels) < 2:
        raise DataError(f"{source}: column {data.label_column!r} has {len(labels)} distinct label(s); need >= 2")
    # Without a trained OOS class, a threshold detector (msp, energy) still answers oos_label for rejected queries.
    if data.oos_label is not None and data.oos_label not in labels and data.oos_detector in ("none", "oos_class"):
        raise DataError(
            f"{source}: oos_label {data.oos_label!r} is not a label of column {data.label_column!r}"
            f"{'' if data.oos_detector == 'none' else ' (oos_detector oos_class needs that class)'}"
        )
    for role in list(splits):
        splits[role] = encode_labels(splits[role], wanted[role], data.label_column, labels, source)

    return DatasetDict(finish_splits(splits, data, seed)), labels


def load_eval_split(data: DataArguments, split: str, labels: list[str]) -> Dataset:
    """One split of any dataset, encoded with a trained run's label map (unknown labels are an error)."""
    ds, source = load_one_split(data, split)
    check_columns(split, ds, _columns(data), source)
    ds = encode_labels(ds, split, data.label_column, labels, source)
    return sample(ds, data.max_eval_samples, 0)
