"""Classification data: queries (or text pairs) with one label each, from any source `querytune.data` loads."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from querytune.config import DataArguments
from querytune.data import (
    DataError,
    UnseenLabels,
    check_columns,
    encode_labels,
    finish_splits,
    is_unseen,
    label_names,
    load_one_split,
    load_splits,
    sample,
)


def _columns(data: DataArguments) -> list[str]:
    return [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])


def load_classification_splits(data: DataArguments, seed: int, unseen: UnseenLabels | None = None,
                               oos_detector: str = "none") -> tuple[DatasetDict, list[str]]:  # fmt: skip
    """Train / validation / (test) splits with an integer `labels` column, and the label names.

    The label map comes from the whole train split, before any `max_*_samples` subsetting, so it does not depend
    on the sample size. Without a validation split, a seeded (stratified when possible) one is carved from train.
    Eval/test labels that train lacks follow `data.unseen_labels`; `unseen` (default: a new one) records what was
    done, per split role. `oos_label` must be a trained label unless `oos_detector` answers it without one.
    """
    unseen = unseen if unseen is not None else UnseenLabels(data.unseen_labels)
    found, wanted, source = load_splits(data)
    splits: dict[str, Dataset] = {}
    for role, ds in found.items():
        check_columns(wanted[role], ds, _columns(data), source)
        splits[role] = ds
    labels = label_names(splits["train"], data.label_column)
    if len(labels) < 2:
        raise DataError(f"{source}: column {data.label_column!r} has {len(labels)} distinct label(s); need >= 2")
    # Without a trained OOS class, a threshold detector (msp, energy) still answers oos_label for rejected queries.
    if data.oos_label is not None and data.oos_label not in labels and oos_detector in ("none", "oos_class"):
        raise DataError(
            f"{source}: oos_label {data.oos_label!r} is not a label of column {data.label_column!r}"
            f"{'' if oos_detector == 'none' else ' (oos_detector oos_class needs that class)'}"
        )
    for role in list(splits):
        policy = unseen if role != "train" else None  # the train split defines the labels: never dropped or kept
        splits[role] = encode_labels(splits[role], wanted[role], data.label_column, labels, source, policy, role)

    splits = finish_splits(splits, data, seed)
    count_unseen(splits, unseen)
    return DatasetDict(splits), labels


def count_unseen(splits: dict[str, Dataset], unseen: UnseenLabels) -> None:
    """as_wrong: record how many rows of each eval split hold a label the train split lacks (after sampling)."""
    if unseen.policy == "as_wrong":
        for role, ds in splits.items():
            if role != "train":
                unseen.counts[role] = sum(1 for i in ds["labels"] if is_unseen(i))


def load_eval_split(data: DataArguments, split: str, labels: list[str],
                    unseen: UnseenLabels | None = None) -> Dataset:  # fmt: skip
    """One split of any dataset, encoded with a trained run's label map (`data.unseen_labels` for labels the run
    never saw; `unseen`, when given, records what was done under the name `split`)."""
    unseen = unseen if unseen is not None else UnseenLabels(data.unseen_labels)
    ds, source = load_one_split(data, split)
    check_columns(split, ds, _columns(data), source)
    ds = encode_labels(ds, split, data.label_column, labels, source, unseen, split)
    ds = sample(ds, data.max_eval_samples, 0)
    count_unseen({split: ds}, unseen)
    return ds
