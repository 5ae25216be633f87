"""Eval/test labels that the train split lacks (`unseen_labels: error | as_wrong | drop`), for intents and slot tags.

Published splits often hold a few of them (multi-intent strings like `a#b`, rare slot tags). `error` (the default)
names the option; `as_wrong` keeps the rows and scores them as errors, as JointBERT's published evaluation does with
its UNK label; `drop` removes the rows and the metrics count them. The train split defines the labels and is never
touched. The end-to-end tests check the two policies against each other on the same trained model: a row with an
unseen label can never be right, so `as_wrong`'s score times all rows equals `drop`'s score times the kept rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import EvalPrediction

from querytune.cli import main
from querytune.config import DataArguments, load_config
from querytune.data import DataError, UnseenLabels, is_unseen
from querytune.tasks import get_task
from querytune.tasks.classification.data import load_classification_splits, load_eval_split
from querytune.tasks.slots.data import load_tagging_eval_split, load_tagging_splits

from .conftest import (
    SLOT_WORDS,
    build_tiny_checkpoint,
    data_sections,
    make_rows,
    make_slot_rows,
    tiny_experiment,
    write_jsonl,
)

# Test rows whose intent the train split lacks: a multi-intent string and a new intent (3 rows, 2 labels).
UNSEEN_INTENT_ROWS = [{"text": "track order 5 and return my lamp", "intent": "order_status#return_refund"},
                      {"text": "hello there", "intent": "greeting"}, {"text": "hi again", "intent": "greeting"}]  # fmt: skip


@pytest.fixture(scope="module")
def intent_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unseen_intents")
    write_jsonl(root / "train.jsonl", make_rows(16, 0))
    write_jsonl(root / "validation.jsonl", make_rows(4, 1))
    write_jsonl(root / "test.jsonl", make_rows(4, 2) + UNSEEN_INTENT_ROWS)
    return root


def args(data: Path, **kw) -> DataArguments:
    return DataArguments(dataset_name=str(data), label_column="intent", **kw)


# --- data: intents
def test_error_names_the_labels_and_the_option(intent_data):
    with pytest.raises(DataError) as info:
        load_classification_splits(args(intent_data), seed=0)
    message = str(info.value)
    assert "split 'test' has label(s) ['greeting', 'order_status#return_refund']" in message
    assert "unseen_labels: as_wrong" in message and "unseen_labels: drop" in message


def test_as_wrong_keeps_the_rows_with_ids_no_prediction_can_have(intent_data):
    unseen = UnseenLabels("as_wrong")
    splits, labels = load_classification_splits(args(intent_data, unseen_labels="as_wrong"), 0, unseen)
    test = splits["test"]
    assert len(test) == 16 + 3
    kept = [i for i in test["labels"] if is_unseen(i)]
    assert len(kept) == 3 and len(set(kept)) == 2 and all(i < -100 for i in kept)  # one id per unseen label
    assert set(unseen.ids) == {"greeting", "order_status#return_refund"}
    assert unseen.metrics("test") == {"num_unseen_as_wrong": 3}
    assert all(0 <= i < len(labels) for i in splits["train"]["labels"])  # train is never touched


def test_drop_removes_the_rows_and_counts_them(intent_data):
    unseen = UnseenLabels("drop")
    splits, labels = load_classification_splits(args(intent_data, unseen_labels="drop"), 0, unseen)
    assert len(splits["test"]) == 16 and set(splits["test"]["intent"]) <= set(labels)
    assert unseen.metrics("test") == {"num_dropped_unseen": 3} and unseen.metrics("validation") == {
        "num_dropped_unseen": 0
    }
    reference, _ = load_classification_splits(args(intent_data, test_split=None), 0)
    assert splits["train"]["text"] == reference["train"]["text"]  # train is never touched


def test_unseen_ids_are_always_wrong_in_the_metrics(tmp_path, tiny_bert, intent_data):
    """A classification metric over a split with rows kept as wrong: those rows lower accuracy, whatever is predicted."""
    config = load_config(tiny_experiment(tmp_path, tiny_bert, intent_data, unseen_labels="as_wrong"))
    task = get_task("intent")(config)
    task.labels = ["a", "b"]
    labels = np.array([0, 1, -101, -102])
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    metrics = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == 0.5


def test_eval_split_of_a_run_follows_the_option(intent_data):
    labels = ["order_status", "product_search", "return_refund", "store_locator"]
    with pytest.raises(DataError, match="unseen_labels"):
        load_eval_split(args(intent_data), "test", labels)
    assert len(load_eval_split(args(intent_data, unseen_labels="as_wrong"), "test", labels)) == 19
    unseen = UnseenLabels("drop")
    assert len(load_eval_split(args(intent_data, unseen_labels="drop"), "test", labels, unseen)) == 16
    assert unseen.metrics("test") == {"num_dropped_unseen": 3}


# --- data: slot tags (and the joint task's intents)
def _with_unseen_tags(rows: list[dict], n: int, new_intent: str | None = None) -> list[dict]:
    """The first n rows with a color tagged as a type the train split lacks ("shade"); with `new_intent`, one more
    row gets an intent the train split lacks."""
    out, changed = [], 0
    for row in rows:
        row = dict(row, tags=list(row["tags"]))
        if changed < n and "B-color" in row["tags"]:
            row["tags"][row["tags"].index("B-color")] = "B-shade"
            changed += 1
        elif new_intent and changed == n:
            row["intent"], new_intent = new_intent, None
        out.append(row)
    assert changed == n
    return out


@pytest.fixture(scope="module")
def slot_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unseen_slots")
    write_jsonl(root / "train.jsonl", make_slot_rows(48, 0))
    write_jsonl(root / "validation.jsonl", make_slot_rows(8, 1))
    write_jsonl(root / "test.jsonl", _with_unseen_tags(make_slot_rows(16, 2), 2, new_intent="cancel_order"))
    return root


@pytest.mark.parametrize("task", ["slots", "intent_slots"])
def test_slot_tags_follow_the_option(slot_data, task):
    with_intent = task == "intent_slots"
    error = data_sections(task=task, dataset_name=str(slot_data), label_column="intent")
    with pytest.raises(DataError) as info:
        load_tagging_splits(*error, 0, with_intent)
    assert "split 'test' has tag(s) ['B-shade']" in str(info.value) and "unseen_labels" in str(info.value)

    kept = load_tagging_splits(*data_sections(task=task, dataset_name=str(slot_data), label_column="intent",
                                              unseen_labels="as_wrong"), 0, with_intent)  # fmt: skip
    test = kept.splits["test"]
    assert len(test) == 16 and "B-shade" not in kept.tags
    shade = kept.unseen.tags.ids["B-shade"]
    assert shade < -100 and sum(ids.count(shade) for ids in test["tag_ids"]) == 2
    assert kept.unseen.metrics("test") == {"num_unseen_as_wrong": 3 if with_intent else 2}
    if with_intent:
        assert sum(1 for i in test["intent_labels"] if is_unseen(i)) == 1

    dropped = load_tagging_splits(*data_sections(task=task, dataset_name=str(slot_data), label_column="intent",
                                                 unseen_labels="drop"), 0, with_intent)  # fmt: skip
    assert len(dropped.splits["test"]) == (13 if with_intent else 14)
    assert dropped.unseen.metrics("test") == {"num_dropped_unseen": 3 if with_intent else 2}
    assert dropped.splits["train"]["words"] == kept.splits["train"]["words"]  # train is never touched


def test_tagging_eval_split_of_a_run_follows_the_option(slot_data):
    tags = ["O", "B-brand", "I-brand", "B-color", "I-color", "B-product", "I-product", "B-size", "I-size"]
    data, slot_args = data_sections(task="slots", dataset_name=str(slot_data))
    with pytest.raises(DataError, match="unseen_labels"):
        load_tagging_eval_split(data, slot_args, "test", tags, None)
    data.unseen_labels = "drop"
    assert len(load_tagging_eval_split(data, slot_args, "test", tags, None)) == 14


# --- end to end: training evaluates its test split; `querytune eval` re-scores it under each policy
def _eval(run: Path, data: Path, policy: str, capsys, *extra: str) -> dict:
    capsys.readouterr()  # what training printed (Trainer logs its metrics to stdout)
    assert main(["eval", str(run), "--dataset_name", str(data), "--unseen_labels", policy, "--no_merge", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_intent_run_with_unseen_test_labels(tmp_path, tiny_bert, intent_data, capsys):
    refused = tiny_experiment(tmp_path, tiny_bert, intent_data, output_dir=str(tmp_path / "refused"))
    assert main(["train", str(refused)]) == 2
    assert "unseen_labels: as_wrong" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "all_results.json").exists()

    exp = tiny_experiment(tmp_path, tiny_bert, intent_data, method="lora", max_steps=4, unseen_labels="as_wrong")
    assert main(["train", str(exp)]) == 0
    run = tmp_path / "run"
    trained = json.loads((run / "all_results.json").read_text())
    assert trained["test_num_unseen_as_wrong"] == 3

    as_wrong = _eval(run, intent_data, "as_wrong", capsys)
    dropped = _eval(run, intent_data, "drop", capsys)
    assert as_wrong["num_examples"] == 19 and as_wrong["num_unseen_as_wrong"] == 3
    assert dropped["num_examples"] == 16 and dropped["num_dropped_unseen"] == 3
    # the rows kept as wrong are never right, and every other row scores as in `drop`
    assert as_wrong["accuracy"] * 19 == pytest.approx(dropped["accuracy"] * 16)
    assert trained["test_accuracy"] == pytest.approx(as_wrong["accuracy"])  # Trainer and `eval` agree
    assert main(["eval", str(run), "--dataset_name", str(intent_data), "--unseen_labels", "error"]) == 2
    assert "unseen_labels" in capsys.readouterr().err


def test_joint_run_with_unseen_test_tags_and_intents(tmp_path, slot_data, capsys):
    model = build_tiny_checkpoint("bert", tmp_path / "slot_bert", extra_words=(*SLOT_WORDS, "shade"))
    exp = tiny_experiment(tmp_path, model, slot_data, task="intent_slots", method="lora", max_steps=4,
                          unseen_labels="as_wrong")  # fmt: skip
    assert main(["train", str(exp)]) == 0
    run = tmp_path / "run"
    trained = json.loads((run / "all_results.json").read_text())
    assert trained["test_num_unseen_as_wrong"] == 3

    as_wrong = _eval(run, slot_data, "as_wrong", capsys)
    dropped = _eval(run, slot_data, "drop", capsys)
    assert as_wrong["num_examples"] == 16 and dropped["num_examples"] == 13 and dropped["num_dropped_unseen"] == 3
    # an unseen tag or intent makes its row's frame wrong: exact match over all rows vs over the kept rows
    assert as_wrong["exact_match"] * 16 == pytest.approx(dropped["exact_match"] * 13)
    assert as_wrong["intent_accuracy"] * 16 <= 15
    # the Trainer path (ids below -100 at the words' first sub-tokens) scores the spans the word-level path scores
    assert trained["test_slot_num_gold_spans"] == as_wrong["slot_num_gold_spans"]
    assert trained["test_exact_match"] == pytest.approx(as_wrong["exact_match"])
    assert as_wrong["slot_num_gold_spans"] > dropped["slot_num_gold_spans"]
