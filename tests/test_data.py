"""Data loading: local formats, label maps, carved validation splits and the errors that name the problem."""

from __future__ import annotations

import datasets
import pytest

from querytune.config import DataArguments
from querytune.data import DataError
from querytune.tasks.classification.data import load_classification_splits, load_eval_split

from .conftest import make_rows, write_jsonl


def args(**kw) -> DataArguments:
    return DataArguments(**{"label_column": "intent", **kw})


def test_local_folder_splits_and_sorted_label_map(tiny_data):
    splits, labels = load_classification_splits(args(dataset_name=str(tiny_data)), seed=0)
    assert set(splits) == {"train", "validation", "test"}
    assert labels == sorted(labels) == ["order_status", "product_search", "return_refund", "store_locator"]
    row = splits["train"][0]
    assert labels[row["labels"]] == row["intent"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_file_formats(tmp_path, fmt):
    rows = make_rows(6, 0)
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        ds.to_csv(path, index=False)
    elif fmt == "tsv":
        path.write_text("text\tintent\n" + "".join(f'{r["text"]} "quoted\t{r["intent"]}\n' for r in rows))
    elif fmt == "parquet":
        ds.to_parquet(path)
    else:
        write_jsonl(path, rows)
    splits, labels = load_classification_splits(args(train_file=str(path)), seed=0)
    assert len(labels) == 4
    assert len(splits["train"]) + len(splits["validation"]) == len(rows)


def test_classlabel_order_is_kept(tmp_path):
    names = ["zeta", "alpha", "mid"]
    features = datasets.Features({"text": datasets.Value("string"), "intent": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"text": [f"q{i}" for i in range(30)], "intent": [i % 3 for i in range(30)]},
                                    features=features)  # fmt: skip
    ds.save_to_disk(tmp_path / "ds")
    ds.to_parquet(tmp_path / "train.parquet")
    # parquet keeps the ClassLabel feature in its schema metadata
    splits, labels = load_classification_splits(args(train_file=str(tmp_path / "train.parquet")), seed=0)
    assert labels == names


def test_validation_is_carved_seeded_and_stratified(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", make_rows(20, 0))
    a, _ = load_classification_splits(args(train_file=str(path), validation_split_percentage=20), seed=1)
    b, _ = load_classification_splits(args(train_file=str(path), validation_split_percentage=20), seed=1)
    c, _ = load_classification_splits(args(train_file=str(path), validation_split_percentage=20), seed=2)
    assert a["validation"]["text"] == b["validation"]["text"] != c["validation"]["text"]
    assert len(a["validation"]) == 16
    counts = a["validation"].to_pandas()["labels"].value_counts()
    assert set(counts) == {4}  # stratified: 4 per intent


def test_max_samples_is_a_seeded_sample_not_the_first_rows(tiny_data):
    splits, _ = load_classification_splits(args(dataset_name=str(tiny_data), max_train_samples=8,
                                                max_eval_samples=5), seed=0)  # fmt: skip
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 5 and len(splits["test"]) == 5


def test_missing_column_names_column_and_split(tiny_data):
    with pytest.raises(DataError, match=r"split 'train' has no column 'category'; it has \['text', 'intent'\]"):
        load_classification_splits(args(dataset_name=str(tiny_data), label_column="category"), seed=0)


def test_empty_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(4, 0))
    (tmp_path / "validation.jsonl").write_text("")
    with pytest.raises(DataError, match="could not read|is empty"):
        load_classification_splits(args(dataset_name=str(tmp_path)), seed=0)


def test_eval_label_unseen_in_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(4, 0))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "hello there", "intent": "greeting"}])
    with pytest.raises(DataError, match=r"split 'test' has label\(s\) \['greeting'\].*do not occur in the train"):
        load_classification_splits(args(dataset_name=str(tmp_path)), seed=0)


def test_unknown_oos_label_and_missing_files(tmp_path, tiny_data):
    with pytest.raises(DataError, match="oos_label 'oos' is not a label"):
        load_classification_splits(args(dataset_name=str(tiny_data), oos_label="oos"), seed=0)
    with pytest.raises(DataError, match="train file not found"):
        load_classification_splits(args(train_file=str(tmp_path / "nope.jsonl")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train file"):
        load_classification_splits(args(dataset_name=str(tmp_path / "empty")), seed=0)


def test_hub_dataset_offline_gives_a_hint(monkeypatch):
    with pytest.raises(DataError, match="could not load dataset 'clinc_oos'"):
        load_classification_splits(args(dataset_name="clinc_oos", dataset_config_name="plus"), seed=0)


def test_eval_split_uses_the_run_label_map(tiny_data):
    labels = ["order_status", "product_search", "return_refund", "store_locator", "extra"]
    ds = load_eval_split(args(dataset_name=str(tiny_data)), "test", labels)
    assert ds.features["labels"].names == labels
    with pytest.raises(DataError, match="no split 'dev'"):
        load_eval_split(args(dataset_name=str(tiny_data)), "dev", labels)
