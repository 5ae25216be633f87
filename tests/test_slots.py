"""Slot tagging and joint intent + slots: alignment, BIO repair, the metric, every method's save -> reload, predict."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from querytune.cli import main
from querytune.config import ConfigError, load_config
from querytune.data import DataError
from querytune.inference import LoadedRun
from querytune.methods import get_method, method_names
from querytune.metrics import load_metric
from querytune.tasks.slots.bio import (
    align_labels,
    b_to_i_map,
    encode_words,
    first_token_positions,
    lost_words,
    repair_bio,
    split_words,
    tag_vocabulary,
    word_ids_from_offsets,
)
from querytune.tasks.slots.data import load_tagging_eval_split, load_tagging_splits
from querytune.tasks.slots.task import SlotsTask
from querytune.train import run

from .conftest import (
    SHARED_DATA,
    TEXTS,
    assert_eval_reproduces,
    data_sections,
    make_slot_rows,
    tiny_experiment,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tokenizer(slot_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(slot_bert))


def slot_experiment(tmp_path, model_dir, data_dir, task="slots", **overrides):
    return tiny_experiment(tmp_path, model_dir, data_dir, task=task, label_column="intent", **overrides)


# --- alignment
def test_multi_subword_words_and_punctuation_get_one_label(tokenizer):
    words = ["red", "nikes", "walking", "size", "10,"]
    enc, (word_ids,) = encode_words(tokenizer, [words], max_length=32)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces == ["[CLS]", "red", "nike", "##s", "walk", "##ing", "size", "10", ",", "[SEP]"]
    assert word_ids == [None, 0, 1, 1, 2, 2, 3, 4, 4, None]
    tags = ["B-color", "B-brand", "B-product", "O", "B-size"]
    names = tag_vocabulary([tags])
    ids = [names.index(t) for t in tags]
    labels = align_labels(word_ids, ids)
    assert labels == [-100, ids[0], ids[1], -100, ids[2], -100, ids[3], ids[4], -100, -100]
    # label_all_tokens (run_ner.py): continuation pieces of a B-X word get I-X, of an O word O
    all_labels = align_labels(word_ids, ids, label_all_tokens=True, b_to_i=b_to_i_map(names))
    as_tags = [names[i] if i != -100 else None for i in all_labels]
    assert as_tags == [None, "B-color", "B-brand", "I-brand", "B-product", "I-product", "O", "B-size", "I-size", None]
    assert first_token_positions(word_ids, 5) == [1, 2, 4, 6, 7]


@pytest.mark.parametrize("kind", ["byte-level-bpe", "metaspace-unigram"])
def test_alignment_by_offsets_works_for_bpe_and_sentencepiece_style_tokenizers(kind):
    """RoBERTa-style byte-level BPE (no add_prefix_space) and DeBERTa-style Metaspace pieces map to their words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(r["tokens"]) for r in make_slot_rows(40, 0)]
    if kind == "byte-level-bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<s>", "</s>"]))
        backend.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0), trim_offsets=True)
        marker = "Ġ"
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>")
        backend.train_from_iterator(corpus, trainer)
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                               ("</s>", 1)])  # fmt: skip
        marker = "▁"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    words = ["red", "adidas", "walking", "boots", "size", "12"]
    enc, (word_ids,) = encode_words(tok, [words], max_length=64)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert word_ids[0] is None and word_ids[-1] is None  # <s> and </s>
    for w, word in enumerate(words):
        assert "".join(p for p, i in zip(pieces, word_ids, strict=True) if i == w).replace(marker, "") == word
    assert None not in first_token_positions(word_ids, len(words))


def test_empty_query_and_offset_edge_cases(tokenizer):
    enc, (word_ids,) = encode_words(tokenizer, [[]], max_length=32)
    assert word_ids == [None, None] and align_labels(word_ids, []) == [-100, -100]
    # SentencePiece-style pieces may include the space before a word; a piece over only a space has no word
    offsets = [(0, 0), (0, 3), (3, 7), (3, 4), (0, 0)]
    assert word_ids_from_offsets(offsets, [(0, 3), (4, 7)]) == [None, 0, 1, None, None]
    words, spans = split_words("  red   nike\tshoes ")
    assert words == ["red", "nike", "shoes"] and spans == [(2, 5), (8, 12), (13, 18)]


def test_truncation_is_counted_and_warned_never_mislabelled(tmp_path, slot_bert, slot_data, caplog):
    long = {"tokens": ["red"] * 30 + ["nike"], "tags": ["B-color"] + ["I-color"] * 29 + ["B-brand"], "intent": "x"}
    write_jsonl(tmp_path / "data" / "train.jsonl", make_slot_rows(8, 0) + [long])
    config = load_config(slot_experiment(tmp_path, slot_bert, tmp_path / "data", max_seq_length=16))
    task = SlotsTask(config)
    splits = task.load_data()
    from transformers import AutoTokenizer

    with caplog.at_level(logging.WARNING):
        encoded = task.tokenize(splits, AutoTokenizer.from_pretrained(str(slot_bert)))
    assert "longer than max_seq_length=16" in caplog.text
    assert "1 of" in caplog.text and "17 words after the cut (17 inside slots)" in caplog.text
    row = next(r for r in encoded["train"] if len(r["input_ids"]) == 16)
    labelled = [label for label in row["labels"] if label != -100]
    # the 14 words that fit keep their own tags; no cut word's tag lands on a kept position
    assert [task.labels[i] for i in labelled] == ["B-color"] + ["I-color"] * 13
    assert lost_words([1, 2, None, None], ["O", "O", "B-x", "O"], truncated=True) == (2, 1, 0)
    assert lost_words([1, None, 3], ["O", "O", "O"], truncated=False) == (0, 0, 1)


def test_label_all_tokens_changes_train_labels_only(tmp_path, slot_bert, slot_data, tokenizer):
    def labelled(label_all: bool) -> dict[str, int]:
        config = load_config(slot_experiment(tmp_path, slot_bert, slot_data, label_all_tokens=label_all))
        task = SlotsTask(config)
        encoded = task.tokenize(task.load_data(), tokenizer)
        return {name: sum(x != -100 for row in ds["labels"] for x in row) for name, ds in encoded.items()}

    first, every = labelled(False), labelled(True)
    words = sum(len(r["tokens"]) for r in make_slot_rows(48, 0))
    assert first["train"] == words < every["train"]  # "walking" is two pieces: walk ##ing
    assert first["validation"] == every["validation"] and first["test"] == every["test"]


def test_prompt_default_length_matches_the_method(slot_bert):
    """The slots collator pads labels by the prompt length; it must be the length the prompt method builds."""
    import peft
    from transformers import AutoModelForTokenClassification

    from querytune.config import MethodArguments
    from querytune.methods.builders import MethodContext, apply_method

    model = AutoModelForTokenClassification.from_pretrained(str(slot_bert), num_labels=3)
    built = apply_method(model, MethodArguments(method="prompt"), MethodContext(task_type=peft.TaskType.TOKEN_CLS))
    assert (
        built.peft_config["default"].num_virtual_tokens
        == get_method("prompt").num_virtual_tokens(MethodArguments(method="prompt"))
        == 20
    )


# --- BIO validation and the label map
def test_bio_repair_and_vocabulary():
    tags, repaired = repair_bio(["I-a", "I-a", "O", "I-b", "B-a", "I-b"])
    assert tags == ["B-a", "I-a", "O", "B-b", "B-a", "B-b"] and repaired == 3
    assert repair_bio([]) == ([], 0)
    # O first, then sorted; every type gets both B- and I-
    assert tag_vocabulary([["B-size", "O"], ["B-brand", "I-brand"]]) == ["O", "B-brand", "B-size", "I-brand", "I-size"]
    assert tag_vocabulary([["B-x"]], ["O", "B-x", "B-y", "I-y"]) == ["O", "B-x", "B-y", "I-y", "I-x"]


def test_repair_warns_with_a_count_and_bad_tags_name_tag_and_split(tmp_path, caplog):
    rows = [{"tokens": ["red", "shoes"], "tags": ["I-color", "B-product"], "intent": "a"},
            {"tokens": ["nike"], "tags": ["B-brand"], "intent": "b"}] * 3  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", [{"tokens": ["red"], "tags": ["B-colour"], "intent": "a"}])
    data, args = data_sections(task="slots", dataset_name=str(tmp_path), label_column="intent")
    with pytest.raises(DataError, match=r"split 'validation' has tag\(s\) \['B-colour'\] in column 'tags'"):
        load_tagging_splits(data, args, seed=0, with_intent=False)
    assert "split 'train': repaired 3 I- tags in 3 examples" in caplog.text

    write_jsonl(tmp_path / "validation.jsonl", [{"tokens": ["red"], "tags": ["S-color"], "intent": "a"}])
    with pytest.raises(DataError, match=r"split 'validation' row 0 has tag 'S-color' .* not BIO"):
        load_tagging_splits(data, args, seed=0, with_intent=False)
    write_jsonl(tmp_path / "validation.jsonl", [{"tokens": ["red", "x"], "tags": ["B-color"], "intent": "a"}])
    with pytest.raises(DataError, match=r"row 0 has 2 words in 'tokens' but 1 tags in 'tags'"):
        load_tagging_splits(data, args, seed=0, with_intent=False)
    write_jsonl(tmp_path / "validation.jsonl", [{"tokens": ["red"], "tags": ["B-color"], "intent": "zzz"}])
    with pytest.raises(DataError, match=r"split 'validation' has label\(s\) \['zzz'\]"):
        load_tagging_splits(data, args, seed=0, with_intent=True)
    with pytest.raises(DataError, match=r"has tag\(s\) \['B-colour'\]"):
        write_jsonl(tmp_path / "test.jsonl", [{"tokens": ["red"], "tags": ["B-colour"], "intent": "a"}])
        load_tagging_eval_split(data, args, "test", ["O", "B-color", "I-color"], None)


def test_classlabel_tags_keep_their_order_and_spaced_strings_work(tmp_path):
    names = ["O", "B-size", "I-size", "B-brand", "I-brand"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=names))})  # fmt: skip
    ds = datasets.Dataset.from_dict({"tokens": [["nike", "10"]] * 10, "tags": [[3, 1]] * 10}, features=features)
    ds.to_parquet(tmp_path / "train.parquet")
    tagged = load_tagging_splits(*data_sections(task="slots", train_file=str(tmp_path / "train.parquet")), 0, False)
    assert tagged.tags == names
    assert tagged.splits["train"][0]["tags"] == ["B-brand", "B-size"]
    write_jsonl(tmp_path / "s" / "train.jsonl", [{"words": "red nike", "bio": "B-color B-brand"}] * 10)
    data, args = data_sections(
        task="slots", dataset_name=str(tmp_path / "s"), tokens_column="words", tags_column="bio"
    )
    tagged = load_tagging_splits(data, args, 0, False)
    assert tagged.tags == ["O", "B-brand", "B-color", "I-brand", "I-color"]
    assert tagged.splits["train"][0]["words"] == ["red", "nike"]


def test_slot_options_belong_to_slot_tasks(tmp_path, tiny_bert, tiny_data):
    with pytest.raises(ConfigError, match="label_all_tokens is set but task is 'intent'"):
        load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, label_all_tokens=True))


# --- the metric module, on a hand-computed case
def test_metric_module_counts_every_span_error_kind():
    gold = [
        ["B-color", "B-brand", "I-brand", "O", "B-size"],  # color right; brand boundary wrong; size missed
        ["B-product", "I-product", "O", "O"],  # predicted as brand over the same words: wrong type
        ["O", "B-brand", "I-brand", "O"],  # predicted color over words 2-3: wrong type and boundary
        ["O", "O"],  # a spurious span
    ]
    pred = [
        ["B-color", "B-brand", "O", "O", "O"],
        ["B-brand", "I-brand", "O", "O"],
        ["O", "O", "B-color", "I-color"],
        ["B-size", "O"],
    ]
    metric = load_metric("slots")
    out = metric.compute(predictions=pred, references=gold, intent_predictions=[0, 1, 1, 0],
                         intent_references=[0, 1, 0, 0], report=True)  # fmt: skip
    assert out["num_gold_spans"] == 5 and out["num_predicted_spans"] == 5
    assert (out["correct"], out["wrong_type"], out["wrong_boundary"], out["wrong_type_and_boundary"]) == (1, 1, 1, 1)
    assert (out["missed"], out["spurious"]) == (1, 1)
    assert out["precision"] == pytest.approx(1 / 5) and out["recall"] == pytest.approx(1 / 5)
    assert out["f1"] == pytest.approx(1 / 5)
    assert out["token_accuracy"] == pytest.approx(7 / 15)  # 3 + 2 + 1 + 1 of 15 words
    assert out["intent_accuracy"] == pytest.approx(3 / 4)
    assert out["exact_match"] == 0.0
    assert out["report"]["color"]["precision"] == pytest.approx(1 / 2) and out["report"]["color"]["support"] == 1
    assert out["confused_types"] == [{"gold": "product", "predicted": "brand", "count": 1}]
    assert "color" in out["report_text"]
    same = metric.compute(predictions=gold, references=gold, intent_predictions=[1] * 4, intent_references=[1] * 4)
    assert same["f1"] == 1.0 and same["exact_match"] == 1.0 and same["spurious"] == same["missed"] == 0


def test_metric_strict_mode_drops_spans_that_open_with_i():
    gold, pred = [["B-a", "I-a", "O"]], [["I-a", "I-a", "O"]]
    metric = load_metric("slots")
    assert metric.compute(predictions=pred, references=gold)["f1"] == 1.0  # conlleval reads I-a I-a as a span
    strict = metric.compute(predictions=pred, references=gold, mode="strict")
    assert strict["f1"] == 0.0 and strict["missed"] == 1 and strict["num_predicted_spans"] == 0
    for mode in (None, "strict"):  # no span anywhere (empty queries included) is zero, not a crash
        empty = metric.compute(predictions=[[], ["O"]], references=[[], ["O"]], mode=mode, report=True)
        assert empty["f1"] == 0.0 and empty["token_accuracy"] == 1.0 and empty["num_gold_spans"] == 0


# --- every method: train 2 steps, save, reload, identical logits
METHODS = method_names()


def _outputs(model, tokenizer, task, texts=TEXTS):
    """Sub-word logits of the in-memory model through the task's own inference path."""
    live = SimpleNamespace(model=model.eval(), tokenizer=tokenizer, device=torch.device("cpu"))
    return task.infer(live, [split_words(t)[0] for t in texts])


def _assert_same(got, expected, tol):
    for g, e in zip(got, expected, strict=True):
        assert g.positions == e.positions
        assert np.abs(g.slot_logits - e.slot_logits).max() < tol
        if e.intent_logits is not None:
            assert np.abs(g.intent_logits - e.intent_logits).max() < tol


@pytest.mark.parametrize("task", ["slots", "intent_slots"])
@pytest.mark.parametrize("method", METHODS)
def test_save_reload_identical_logits(tmp_path, slot_bert, slot_data, task, method):
    extra = {"adalora_tinit": 0, "adalora_tfinal": 0} if method == "adalora" else {}
    if method == "prompt":
        extra["prompt_num_virtual_tokens"] = 4
    result = run(load_config(slot_experiment(tmp_path, slot_bert, slot_data, task=task, method=method, **extra)))
    loaded = LoadedRun(result.output_dir, merge=False)
    expected = _outputs(result.model, result.tokenizer, loaded.task)
    assert all(np.isfinite(o.slot_logits).all() for o in expected)
    _assert_same(loaded.task.infer(loaded, [split_words(t)[0] for t in TEXTS]), expected, 1e-5)
    if get_method(method).mergeable:
        merged = LoadedRun(result.output_dir, merge=True)
        _assert_same(merged.task.infer(merged, [split_words(t)[0] for t in TEXTS]), expected, 1e-4)
    metrics = json.loads((result.output_dir / "all_results.json").read_text())
    prefix = "test_slot_" if task == "intent_slots" else "test_"
    assert f"{prefix}f1" in metrics and f"{prefix}missed" in metrics
    # the reloaded run scores the test split as training did (slot F1, and intent accuracy / exact match if joint)
    assert_eval_reproduces(result.output_dir)
    if task == "intent_slots":
        assert (result.output_dir / "test_intent_report.json").is_file()
        heads = {n for n, p in result.model.named_parameters() if p.requires_grad}
        assert any("intent_classifier" in n for n in heads) and any("slot_classifier" in n for n in heads)
    errors = json.loads((result.output_dir / "test_span_errors.json").read_text())
    assert set(errors["span_errors"]) >= {"wrong_type", "wrong_boundary", "missed", "spurious"}
    report = json.loads((result.output_dir / "test_report.json").read_text())
    assert "micro avg" in report and all(isinstance(row, dict) for row in report.values())


# --- prediction: spans with character offsets; re-evaluation through the CLI
class _PieceTagger(torch.nn.Module):
    """A stand-in token classifier that tags each sub-token by its text, so the expected spans are known exactly."""

    def __init__(self, tokenizer, tags: list[str], piece_tags: dict[str, str]) -> None:
        super().__init__()
        table = torch.full((len(tokenizer.get_vocab()), len(tags)), 0.0)
        for piece, i in tokenizer.get_vocab().items():
            table[i, tags.index(piece_tags.get(piece, "O"))] = 10.0
        self.table = table

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_predict_spans_have_character_offsets_into_the_query(tmp_path, slot_bert, slot_data, tokenizer):
    config = load_config(slot_experiment(tmp_path, slot_bert, slot_data))
    task = SlotsTask(config)
    task.labels = tag_vocabulary([["B-color", "B-brand", "B-product", "B-size"]])
    # continuation pieces (##s, ##ing) are tagged nonsense on purpose: only a word's first piece may count
    pieces = {"red": "B-color", "nike": "B-brand", "##s": "B-size", "walk": "B-product", "##ing": "B-color",
              "shoes": "I-product", "10": "B-size"}  # fmt: skip
    fake = SimpleNamespace(model=_PieceTagger(tokenizer, task.labels, pieces), tokenizer=tokenizer,
                           device=torch.device("cpu"))  # fmt: skip
    query = "  red nikes   walking shoes size 10, please"
    (result,) = task.predict(fake, [query])
    spans = [(s["text"], s["label"], s["start"], s["end"]) for s in result["spans"]]
    assert spans == [("red", "color", 2, 5), ("nikes", "brand", 6, 11), ("walking shoes", "product", 14, 27),
                     ("10,", "size", 33, 36)]  # fmt: skip
    assert all(query[s["start"] : s["end"]] == s["text"] for s in result["spans"])
    top = np.exp(10.0) / (np.exp(10.0) + len(task.labels) - 1)
    assert all(s["score"] == pytest.approx(top, abs=1e-6) for s in result["spans"])


@pytest.fixture(scope="module", params=["slots", "intent_slots"])
def trained_run(request, tmp_path_factory, slot_bert, slot_data):
    """A tiny BERT trained long enough (60 steps) to learn the templated corpus."""
    tmp = tmp_path_factory.mktemp(request.param)
    exp = slot_experiment(tmp, slot_bert, slot_data, task=request.param, max_steps=60, learning_rate=0.005,
                          warmup_steps=0)  # fmt: skip
    assert main(["train", str(exp)]) == 0
    return request.param, tmp / "run"


def test_predict_cli_on_a_trained_run(trained_run, capsys):
    task, run_dir = trained_run
    query = "where is my  puma boots order"
    assert main(["predict", str(run_dir), query, "track my rain jacket order", "--top_k", "1"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in results] == [query, "track my rain jacket order"]
    for r in results:
        for span in r["spans"]:
            assert r["query"][span["start"] : span["end"]] == span["text"] and 0 < span["score"] <= 1
    found = {(s["text"], s["label"], s["start"], s["end"]) for s in results[0]["spans"]}
    assert ("puma", "brand", 13, 17) in found and ("boots", "product", 18, 23) in found
    assert ("rain jacket", "product", 9, 20) in {(s["text"], s["label"], s["start"], s["end"])
                                                  for s in results[1]["spans"]}  # fmt: skip
    if task == "intent_slots":
        assert [r["intent"] for r in results] == ["order_status", "order_status"]
        assert len(results[0]["top_k"]) == 1 and 0.5 < results[0]["intent_score"] <= 1
    else:
        assert "intent" not in results[0]


def test_eval_cli_reproduces_the_training_test_scores(trained_run, slot_data, capsys):
    task, run_dir = trained_run
    assert main(["eval", str(run_dir), "--dataset_name", str(slot_data), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    trained = json.loads((run_dir / "all_results.json").read_text())
    names = (
        ["slot_f1", "slot_missed", "intent_accuracy", "exact_match"] if task == "intent_slots" else ["f1", "missed"]
    )
    for name in names:
        assert result[name] == pytest.approx(trained[f"test_{name}"], abs=1e-9), name
    assert result["num_examples"] == 12
    assert (run_dir / "evals" / f"{slot_data.name}-test" / "test_report.json").is_file()
    learned = trained["test_slot_f1" if task == "intent_slots" else "test_f1"]
    assert learned > 0.8, "the tiny model should learn the templated slots in 60 steps"


# --- the joint model on every architecture, and the methods PEFT cannot apply
@pytest.mark.parametrize("arch", ["bert", "roberta", "mpnet", "deberta-v2"])
def test_joint_model_loads_from_every_encoder_and_round_trips(tmp_path, tiny_models, arch):
    from querytune.models import load_pretrained
    from querytune.tasks.slots.joint_model import AutoModelForIntentAndSlots

    model, new = load_pretrained(AutoModelForIntentAndSlots, str(tiny_models[arch]), num_labels=3,
                                 intent_labels=["a", "b"])  # fmt: skip
    assert new == ["intent_classifier", "slot_classifier"], "the encoder weights must load under their prefix"
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    out = model(input_ids=ids, labels=torch.tensor([[-100, 0, 1, 2, -100]]), intent_labels=torch.tensor([1]))
    assert out.intent_logits.shape == (1, 2) and out.slot_logits.shape == (1, 5, 3) and out.loss > 0
    model.save_pretrained(tmp_path / "joint")
    again, new = load_pretrained(AutoModelForIntentAndSlots, str(tmp_path / "joint"))
    assert new == [] and type(again) is type(model) and again.config.intent_labels == ["a", "b"]
    model.eval(), again.eval()
    assert torch.allclose(model(input_ids=ids).slot_logits, again(input_ids=ids).slot_logits)


def test_prefix_on_an_encoder_without_a_kv_cache_fails_before_training(tmp_path, tiny_models, slot_data):
    config = load_config(slot_experiment(tmp_path, tiny_models["mpnet"], slot_data, task="intent_slots",
                                         method="prefix"))  # fmt: skip
    with pytest.raises(ValueError, match=r"method 'prefix' cannot be applied to MPNetForIntentAndSlots"):
        run(config)


# --- integration: the real all-MiniLM-L6-v2 on a SNIPS slice, offline, end to end
SNIPS = SHARED_DATA / "snips"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not SNIPS.is_dir(), reason="../shared/data/snips is not present")
def test_minilm_learns_snips_slots_and_intents(tmp_path, capsys):
    """3 SNIPS intents (26 slot types in test), 100 training queries each, 6 epochs: about 45 s on 2 free cores."""
    from .conftest import REPO, corpus_slice

    keep = {"RateBook", "GetWeather", "SearchCreativeWork"}
    corpus_slice(SNIPS, tmp_path / "snips", keep, {"train": 100, "validation": 20, "test": 40})
    out = tmp_path / "run"
    args = ["train", str(REPO / "experiments/slots/snips-joint-full.yaml"), "--dataset_name", str(tmp_path / "snips"),
            "--output_dir", str(out), "--num_train_epochs", "6", "--learning_rate", "3e-4",
            "--per_device_train_batch_size", "16", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--disable_tqdm", "true"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "all_results.json").read_text())
    # Measured: slot F1 0.82, intent accuracy 1.0 (chance: 0.33); untrained slot heads score near 0.
    assert metrics["test_slot_f1"] > 0.7 and metrics["test_intent_accuracy"] > 0.9, metrics
    query = "rate the current novel four out of 6 stars"
    assert main(["predict", str(out), query]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["intent"] == "RateBook"
    spans = {(s["text"], s["label"], s["start"], s["end"]) for s in result["spans"]}
    assert {("four", "rating_value", 23, 27), ("6", "best_rating", 35, 36)} <= spans, spans
    assert main(["eval", str(out), "--dataset_name", str(tmp_path / "snips"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["slot_f1"] == pytest.approx(metrics["test_slot_f1"], abs=1e-6)
    assert result["exact_match"] == pytest.approx(metrics["test_exact_match"], abs=1e-6)


def test_model_card_of_a_slot_run_names_its_task_and_metrics(trained_run):
    from querytune.hub import model_card
    from querytune.runs import read_run

    task, run_dir = trained_run
    card = model_card(run_dir, read_run(run_dir))
    assert card.data.pipeline_tag == "token-classification" and "slot-filling" in card.data.tags
    names = {r.metric_name for r in card.data.eval_results}
    assert "Slot F1 (entity-level)" in names
    if task == "intent_slots":
        assert {"Intent accuracy", "Exact match (intent and all slots)"} <= names
