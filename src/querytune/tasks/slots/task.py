"""Slot tagging of queries (token classification) and joint intent + slot parsing (JointBERT).

"red nike running shoes size 10" -> color "red", brand "nike", product type "running shoes", size "10". Data are
words with one BIO (IOB2) tag each; the model tags sub-words, and everything that is scored or returned is
word-level: a word's tag is the prediction at its first sub-token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from datasets import DatasetDict
from sklearn.metrics import classification_report, confusion_matrix
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, EvalPrediction

from querytune import distill
from querytune.config import ExperimentConfig
from querytune.data import UnseenLabels, append_rows, column_strings
from querytune.errors import ConfigError
from querytune.methods.registry import get_method
from querytune.metrics import load_metric
from querytune.progress import progress
from querytune.tasks.base import Task, length_batches
from querytune.tasks.shared import oos
from querytune.tasks.shared.reports import most_confused_pairs
from querytune.tasks.shared.trainers import UnseenLabelsTrainer, trainer_class_for
from querytune.tasks.slots.args import SlotsArguments
from querytune.tasks.slots.bio import (
    IGNORE_INDEX,
    OUTSIDE,
    align_labels,
    b_to_i_map,
    encode_words,
    first_token_positions,
    lost_words,
    lost_words_warning,
    spans_from_tags,
    split_words,
)
from querytune.tasks.slots.data import Unseen, load_tagging_eval_split, load_tagging_splits
from querytune.tasks.slots.joint_model import AutoModelForIntentAndSlots

logger = logging.getLogger(__name__)


def prompt_length(config: ExperimentConfig) -> int:
    """How many virtual tokens the method puts in front of the model's output (prompt tuning; 0 for the others)."""
    return get_method(config.method.method).num_virtual_tokens(config.method)


@dataclass
class QueryOutput:
    """Word-level model output for one query."""

    positions: list[int | None]  # first sub-token of each word; None where the word has none (truncated/empty)
    slot_logits: np.ndarray  # [words, tags]; NaN rows for words without a sub-token
    intent_logits: np.ndarray | None = None  # [intents], joint task only


def _arrays(value: Any) -> list[np.ndarray]:
    return [np.asarray(v) for v in value] if isinstance(value, (tuple, list)) else [np.asarray(value)]


def split_outputs(
    predictions: Any, label_ids: Any
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Slot logits, intent logits, slot label ids and intent ids from what Trainer hands over, by rank.

    Trainer returns one array or a tuple (one per model output / label name); across batches it pads the token
    axis of both logits and labels with -100, so positions are only read where the label is not -100.
    """
    preds, labels = _arrays(predictions), _arrays(label_ids)
    slot_logits = next(p for p in preds if p.ndim == 3)
    intent_logits = next((p for p in preds if p.ndim == 2), None)
    slot_ids = next(x for x in labels if x.ndim == 2)
    intent_ids = next((x for x in labels if x.ndim == 1), None)
    if slot_logits.shape[:2] != slot_ids.shape:
        raise ValueError(f"slot logits {slot_logits.shape} do not line up with slot labels {slot_ids.shape}")
    return slot_logits, intent_logits, slot_ids, intent_ids


def word_tags(
    slot_logits: np.ndarray, slot_ids: np.ndarray, tags: list[str], unseen: UnseenLabels | None = None
) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tags at the labelled positions (a word's first sub-token in eval splits). Gold ids below
    -100 are tags the train split lacked, kept by `unseen_labels: as_wrong`: named by `unseen`, never predicted."""
    preds = np.argmax(slot_logits, axis=-1)
    gold_rows, pred_rows = [], []
    for gold, pred in zip(slot_ids, preds, strict=True):
        keep = gold != IGNORE_INDEX
        gold_rows.append([tags[i] if i >= 0 else unseen.name_of(int(i)) for i in gold[keep]])
        pred_rows.append([tags[i] for i in pred[keep]])
    return gold_rows, pred_rows


class SlotsTask(Task):
    """Data, preprocessing, model class, collator, metrics and prediction for BIO slot tagging."""

    model_class: Any = AutoModelForTokenClassification
    peft_task_type = peft.TaskType.TOKEN_CLS
    trainer_class = UnseenLabelsTrainer
    default_metric = "f1"
    with_intent = False
    arguments = SlotsArguments
    pipeline_tag = "token-classification"
    card_tags = ("slot-filling",)
    card_metrics = {"f1": ("f1", "Slot F1 (entity-level)", 100.0)}
    report_columns = [("f1", "slot F1 %", 100.0)]

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)  # self.labels: the tag label map
        self.intents: list[str] | None = None
        self.oos: oos.OosDetector | None = None  # the intent head's OOS detector (joint task), chosen on validation
        self.unseen = Unseen.of(config.data.unseen_labels)  # what unseen_labels did to the eval splits
        if config.data.text_pair_column:
            raise ValueError(f"task {config.data.task!r} takes single queries; text_pair_column must be unset")

    # --- data
    def load_data(self) -> DatasetDict:
        tagged = load_tagging_splits(
            self.config.data, self.args, self.config.training.seed, with_intent=self.with_intent
        )
        self.labels, self.intents, self.unseen = tagged.tags, tagged.intents, tagged.unseen
        return tagged.splits

    def label_info(self) -> dict[str, Any]:
        """What is saved as label_map.json and restored by `set_label_info` when a run is loaded."""
        info: dict[str, Any] = {"scheme": "IOB2", "labels": self.labels,
                                "label2id": {tag: i for i, tag in enumerate(self.labels)}}  # fmt: skip
        if self.intents is not None:
            info |= {"intents": self.intents, "intent2id": {name: i for i, name in enumerate(self.intents)}}
        if self.oos is not None:
            info["oos_detector"] = {**self.oos.to_dict(), "oos_label": self.config.data.oos_label}
        return info

    def metadata(self) -> dict[str, Any]:
        return {"intents": self.intents} if self.intents is not None else {}

    def set_label_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
        self.intents = list(info["intents"]) if self.with_intent else None
        detector = dict(info.get("oos_detector") or {})
        detector.pop("oos_label", None)
        self.oos = oos.OosDetector.from_dict(detector) if detector else None

    # --- the intent head's out-of-scope detection (joint task; see querytune.tasks.shared.oos)
    @property
    def intent_oos_id(self) -> int | None:
        oos_label = self.config.data.oos_label
        return self.intents.index(oos_label) if self.intents and oos_label in self.intents else None

    @property
    def intent_oos_answer(self) -> int:
        return self.intent_oos_id if self.intent_oos_id is not None else len(self.intents or [])

    @property
    def intent_names(self) -> list[str]:
        """Intent names by predicted id, the answer for rejected queries included."""
        intents = self.intents or []
        virtual = self.oos is not None and self.intent_oos_id is None
        return [*intents, self.config.data.oos_label] if virtual else intents

    def intent_predictions(self, intent_logits: np.ndarray) -> list[int]:
        return oos.predict_ids(intent_logits, self.oos, self.intent_oos_answer).tolist()

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {tag: i for i, tag in enumerate(self.labels)},
        }

    def _max_length(self, tokenizer) -> int:
        return self.config.model.max_length(tokenizer)

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        """Sub-word inputs with aligned labels; words cut by truncation are counted and reported, never mislabelled.

        `label_all_tokens` applies to the train split only: validation and test are labelled at each word's first
        sub-token, so their scores are word-level whatever the training option.
        """
        data, max_len = self.config.data, self._max_length(tokenizer)
        padding = "max_length" if self.config.model.pad_to_max_length else False
        b_to_i = b_to_i_map(self.labels)

        def encode(batch: dict[str, list], label_all: bool) -> dict[str, list]:
            enc, word_ids = encode_words(tokenizer, batch["words"], max_len, padding)
            out: dict[str, list] = {**enc, "labels": [], "_lost": []}
            for row, (ids, tag_ids, tags) in enumerate(zip(word_ids, batch["tag_ids"], batch["tags"], strict=True)):
                out["labels"].append(align_labels(ids, tag_ids, label_all, b_to_i))
                truncated = sum(enc["attention_mask"][row]) >= max_len
                out["_lost"].append(lost_words(first_token_positions(ids, len(tags)), tags, truncated))
            if self.with_intent:
                out["intent_labels"] = batch["intent_labels"]
            if distill.TEACHER_COLUMN in batch:
                out[distill.TEACHER_COLUMN] = batch[distill.TEACHER_COLUMN]
            return out

        if self.distill_output and self.config.distill.distill_teacher:  # joint task: the intent head's teacher logits
            splits = DatasetDict(splits)
            splits["train"] = distill.add_teacher_logits(splits["train"], self.config.distill.distill_teacher,
                                                         self.distill_output, lambda task: task.distill_labels(),
                                                         self.distill_labels(),
                                                         lambda batch: ([" ".join(w) for w in batch["words"]], None))  # fmt: skip
        encoded = {}
        for name, ds in splits.items():
            ds = ds.map(
                encode,
                batched=True,
                fn_kwargs={"label_all": self.args.label_all_tokens and name == "train"},
                remove_columns=ds.column_names,
                num_proc=data.preprocessing_num_workers,
                desc=f"tokenising {name}",
            )
            message = lost_words_warning(name, ds["_lost"], max_len)
            if message:
                logger.warning(message)
            encoded[name] = ds.remove_columns("_lost")
        return DatasetDict(encoded)

    def collator(self, tokenizer):
        mixed = self.config.training.fp16 or self.config.training.bf16
        pad = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if mixed else None)
        virtual = prompt_length(self.config) if not self.with_intent else 0
        if not virtual:
            return pad

        def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            # PEFT's prompt tuning prepends virtual tokens to the token classifier's logits but passes the labels
            # unchanged; give the virtual positions the ignore label so that logits and labels line up.
            batch = pad(features)
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (virtual, 0), value=IGNORE_INDEX)
            return batch

        return collate

    # --- metrics
    def score(
        self,
        gold: list[list[str]],
        predicted: list[list[str]],
        intent_gold: list[int] | None = None,
        intent_predicted: list[int] | None = None,
        report: bool = False,
    ) -> dict[str, Any]:
        """The `slots` metric module on word-level tags (and intents); joint runs prefix slot metrics with slot_."""
        result = self._slot_metric(gold, predicted, intent_gold, intent_predicted, report)
        if not self.with_intent:
            return result
        joint = ("intent_accuracy", "exact_match", "report", "report_text", "confused_types")
        return {k if k in joint else f"slot_{k}": v for k, v in result.items()}

    def _slot_metric(self, gold, predicted, intent_gold=None, intent_predicted=None, report=False) -> dict[str, Any]:
        return load_metric("slots").compute(
            predictions=predicted,
            references=gold,
            mode="strict" if self.args.strict_iob2 else None,
            intent_predictions=intent_predicted,
            intent_references=intent_gold,
            report=report,
        )

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        slot_logits, intent_logits, slot_ids, intent_ids = split_outputs(prediction.predictions, prediction.label_ids)
        gold, predicted = word_tags(slot_logits, slot_ids, self.labels, self.unseen.tags)
        intent_predicted = np.argmax(intent_logits, axis=-1).tolist() if intent_logits is not None else None
        intent_gold = intent_ids.tolist() if intent_ids is not None else None
        return self.score(gold, predicted, intent_gold, intent_predicted)

    def write_reports(self, predictions: Any, label_ids: Any, out_dir: Path, split: str) -> None:
        slot_logits, intent_logits, slot_ids, intent_ids = split_outputs(predictions, label_ids)
        gold, predicted = word_tags(slot_logits, slot_ids, self.labels, self.unseen.tags)
        intent_predicted = self.intent_predictions(intent_logits) if intent_logits is not None else None
        self._write_reports(gold, predicted, intent_ids, intent_predicted, out_dir, split)
        if self.oos is not None and intent_logits is not None:
            oos.plot_tradeoff(intent_logits, intent_ids, self.oos, out_dir / f"{split}_oos_tradeoff.png",
                              title=f"{self.oos.detector} (intent head) on the {split} split")  # fmt: skip

    def evaluate_trained(self, trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """Score one split at the end of training; for the joint task with an OOS detector, choose its threshold on
        validation first and score the intents with it (argmax figures kept as `argmax_*`)."""
        prefix = "eval" if role == "validation" else "test"
        unseen = {f"{prefix}_{k}": v for k, v in self.unseen.metrics(role).items()}  # what unseen_labels did
        detection = self.config.section("oos") if self.with_intent else None
        if detection is None or detection.oos_detector == "none":
            return {**super().evaluate_trained(trainer, dataset, role, out_dir), **unseen}
        result = trainer.predict(dataset, metric_key_prefix=prefix)
        slot_logits, intent_logits, slot_ids, intent_ids = split_outputs(result.predictions, result.label_ids)
        if role == "validation":
            self.oos = oos.choose_threshold(intent_logits, intent_ids, detection.oos_detector, self.intent_oos_id,
                                            detection.oos_threshold_rule, detection.oos_max_in_scope_drop,
                                            detection.oos_in_scope_recall)  # fmt: skip
        gold, predicted = word_tags(slot_logits, slot_ids, self.labels)
        scored = self.score(gold, predicted, intent_ids.tolist(), self.intent_predictions(intent_logits))
        scored |= {f"intent_{k}": v for k, v in oos.detection_metrics(
            intent_logits, intent_ids, self.oos, self.intent_oos_id, self.intent_oos_answer).items()}  # fmt: skip
        scored["intent_oos_threshold"] = self.oos.threshold
        metrics = {f"{prefix}_{k}": v for k, v in scored.items() if isinstance(v, int | float)}
        metrics |= {f"{prefix}_argmax_{k.removeprefix(f'{prefix}_')}": v for k, v in result.metrics.items()
                    if k.startswith(f"{prefix}_") and k.removeprefix(f"{prefix}_") in ("intent_accuracy", "exact_match")}  # fmt: skip
        metrics |= {k: v for k, v in result.metrics.items() if k.removeprefix(f"{prefix}_") in
                    ("loss", "runtime", "samples_per_second", "steps_per_second")}  # fmt: skip
        if trainer.is_world_process_zero():
            self.write_reports(result.predictions, result.label_ids, out_dir, role)
        return {**metrics, **unseen}

    def _write_reports(self, gold, predicted, intent_gold, intent_predicted, out_dir: Path, split: str) -> None:
        """Per slot type precision/recall/F1 in `{split}_report.{json,txt}` (the classification report's layout, so
        W&B and the Hub read it alike), span errors in `{split}_span_errors.json`, per-intent reports (joint)."""
        with_intent = self.with_intent and intent_gold is not None and intent_predicted is not None
        result = self._slot_metric(gold, predicted, report=True)
        mode = "strict IOB2" if self.args.strict_iob2 else "seqeval default (conlleval)"
        # seqeval's macro average over zero types is NaN (None here): report it as 0, its zero_division value
        report = {name: {k: 0.0 if v is None else v for k, v in row.items()} for name, row in result["report"].items()}
        (out_dir / f"{split}_report.json").write_text(json.dumps(report, indent=2))
        keys = ("correct", "wrong_type", "wrong_boundary", "wrong_type_and_boundary", "missed", "spurious")
        errors = {
            "mode": mode,
            "num_gold_spans": result["num_gold_spans"],
            "num_predicted_spans": result["num_predicted_spans"],
            "token_accuracy": result["token_accuracy"],
            "span_errors": {k: result[k] for k in keys},
            "confused_types": result["confused_types"][:25],
        }
        (out_dir / f"{split}_span_errors.json").write_text(json.dumps(errors, indent=2))
        lines = [f"{k:>24}: {v}" for k, v in errors["span_errors"].items()]
        (out_dir / f"{split}_report.txt").write_text(
            f"{result['report_text']}\nspan errors ({mode}):\n" + "\n".join(lines)
        )
        if with_intent:
            names = self.intent_names
            ids = list(range(len(names)))
            kwargs = {"labels": ids, "target_names": names, "zero_division": 0, "digits": 4}
            intent_gold = np.asarray(intent_gold)
            report = classification_report(intent_gold, intent_predicted, output_dict=True, **kwargs)
            (out_dir / f"{split}_intent_report.json").write_text(json.dumps(report, indent=2))
            (out_dir / f"{split}_intent_report.txt").write_text(
                classification_report(intent_gold, intent_predicted, **kwargs)
            )
            pairs = most_confused_pairs(confusion_matrix(intent_gold, intent_predicted, labels=ids), names)
            (out_dir / f"{split}_intent_confused_pairs.json").write_text(json.dumps(pairs, indent=2))

    # --- inference on a loaded run
    @torch.inference_mode()
    def infer(self, run, word_lists: list[list[str]], batch_size: int = 64) -> list[QueryOutput]:
        """Word-level logits for many queries, batched by length so that little time goes to padding."""
        max_len = self._max_length(run.tokenizer)
        out: list[QueryOutput | None] = [None] * len(word_lists)
        batches = list(length_batches([sum(len(w) + 1 for w in words) for words in word_lists], batch_size))
        for idx in progress(batches, "tagging queries"):
            enc, word_ids = encode_words(run.tokenizer, [word_lists[i] for i in idx], max_len, padding=True)
            inputs = {k: torch.tensor(v, device=run.device) for k, v in enc.items()}
            output = run.model(**inputs)
            slot_logits = output.slot_logits if self.with_intent else output.logits
            # Prompt tuning puts its virtual tokens in front of the token classifier's output.
            slot_logits = slot_logits[:, slot_logits.shape[1] - inputs["input_ids"].shape[1] :].float().cpu().numpy()
            intent_logits = output.intent_logits.float().cpu().numpy() if self.with_intent else None
            for row, i in enumerate(idx):
                positions = first_token_positions(word_ids[row], len(word_lists[i]))
                words = np.full((len(positions), len(self.labels)), np.nan, dtype=np.float32)
                for w, p in enumerate(positions):
                    if p is not None:
                        words[w] = slot_logits[row, p]
                out[i] = QueryOutput(positions, words, intent_logits[row] if intent_logits is not None else None)
        return out  # type: ignore[return-value]

    def logits(self, run, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        """Word-level tag logits [queries, most words, tags] of whitespace-split queries, NaN past a query's end."""
        return self._stack(self.infer(run, [split_words(t)[0] for t in texts], batch_size))

    def _stack(self, outputs: list[QueryOutput]) -> np.ndarray:
        width = max((len(o.positions) for o in outputs), default=0)
        stacked = np.full((len(outputs), width, len(self.labels)), np.nan, dtype=np.float32)
        for i, o in enumerate(outputs):
            stacked[i, : len(o.positions)] = o.slot_logits
        return stacked

    # --- augmentation
    def augment_unsupported(self) -> str | None:
        return None

    def augment_examples(self, split) -> list:
        """Words and tags per row; the label is the intent (joint task, or a slot corpus with an intent column)."""
        from querytune.augment.base import Example

        labels = [""] * len(split)
        if "intent_labels" in split.column_names:
            labels = [self.intents[i] if i >= 0 else "" for i in split["intent_labels"]]
        elif self.config.data.label_column in split.column_names:
            labels = column_strings(split, self.config.data.label_column)
        return [Example(list(words), label, list(tags), row)
                for row, (words, tags, label) in enumerate(zip(split["words"], split["tags"], labels, strict=True))]  # fmt: skip

    def augmented_train(self, train, examples: list):
        tag2id = {tag: i for i, tag in enumerate(self.labels)}
        return append_rows(train, [{**train[ex.source], "words": ex.words, "tags": ex.tags,
                                    "tag_ids": [tag2id[t] for t in ex.tags]} for ex in examples])  # fmt: skip

    def augment_agreement(self, run, examples: list) -> list[bool]:
        """The run predicts each row's spans (type and words) and, for a joint run, its intent."""
        from querytune.augment.base import spans

        if self.with_intent:
            unknown = sorted({ex.label for ex in examples} - set(self.intent_names))
            if unknown:
                raise ConfigError(f"augment_filter_run {run.run_dir}: the run does not know the intent(s) "
                                  f"{unknown[:10]}")  # fmt: skip
        predictions = self.predict(run, [ex.text for ex in examples], top_k=1)
        agree = []
        for p, ex in zip(predictions, examples, strict=True):
            gold = [(kind, " ".join(words)) for kind, words in spans(ex.words, ex.tags or ["O"] * len(ex.words))]
            same = [(s["label"], s["text"]) for s in p["spans"]] == gold
            agree.append(same and (not self.with_intent or p["intent"] == ex.label))
        return agree

    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64, **inputs) -> list[dict[str, Any]]:
        """Slot spans with character offsets into each query, and for a joint run the intent.

        A span's score is the mean, over its words, of the probability of the word's predicted tag (at the
        word's first sub-token). Words are whitespace-separated, as in the training data.
        """
        split = [split_words(t) for t in texts]
        outputs = self.infer(run, [words for words, _ in split], batch_size)
        results = []
        for text, (_, offsets), output in zip(texts, split, outputs, strict=True):
            probs = _softmax(np.nan_to_num(output.slot_logits, nan=0.0))
            ids = np.argmax(probs, axis=-1)
            # A word without a sub-token (cut by truncation) cannot be part of a slot.
            tags = [self.labels[t] if p is not None else OUTSIDE for t, p in zip(ids, output.positions, strict=True)]
            spans = []
            for span in spans_from_tags(tags, strict=self.args.strict_iob2):
                start, end = offsets[span.start][0], offsets[span.end - 1][1]
                score = float(np.mean([probs[w, ids[w]] for w in range(span.start, span.end)]))
                spans.append({"text": text[start:end], "label": span.label, "start": start, "end": end,
                              "score": round(score, 6)})  # fmt: skip
            result: dict[str, Any] = {"query": text}
            if output.intent_logits is not None:
                p = _softmax(output.intent_logits)
                top = np.argsort(p)[::-1][: max(1, top_k)]
                answer = self.intent_predictions(output.intent_logits[None])[0]
                score = float(p[answer]) if answer < len(p) else 0.0
                if self.oos is not None:
                    in_scope = float(oos.scores(output.intent_logits[None], self.oos.detector, self.oos.oos_id)[0])
                    rejected = answer == self.intent_oos_answer and in_scope < self.oos.threshold
                    score = in_scope if rejected else score
                    result |= {"oos": answer == self.intent_oos_answer, "in_scope_score": round(in_scope, 6)}
                result |= {"intent": self.intent_names[answer], "intent_score": round(score, 6),
                           "top_k": [{"label": self.intents[i], "score": round(float(p[i]), 6)} for i in top]}  # fmt: skip
            result["spans"] = spans
            results.append(result)
        return results

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        """Score a loaded run on one split of `self.config.data` with the run's label maps; write the reports.

        Words without a sub-token (cut by truncation) are left out of the scores, as in evaluation during training.
        """
        unseen = Unseen.of(self.config.data.unseen_labels)
        ds = load_tagging_eval_split(self.config.data, self.args, split, self.labels, self.intents, unseen)
        outputs = self.infer(run, ds["words"], batch_size)
        gold, predicted, lost = [], [], []
        for tags, output in zip(ds["tags"], outputs, strict=True):
            kept = [w for w, p in enumerate(output.positions) if p is not None]
            pred_ids = np.argmax(output.slot_logits[kept], axis=-1) if kept else []
            gold.append([tags[w] for w in kept])
            predicted.append([self.labels[i] for i in pred_ids])
            lost.append(lost_words(output.positions, tags, truncated=True))
        message = lost_words_warning(split, lost, self._max_length(run.tokenizer))
        if message:
            logger.warning(message)
        intent_gold = intent_predicted = None
        if self.with_intent:
            intent_gold = list(ds["intent_labels"])
            intent_logits = np.stack([o.intent_logits for o in outputs])
            intent_predicted = self.intent_predictions(intent_logits)
        metrics = self.score(gold, predicted, intent_gold, intent_predicted)
        if self.with_intent and self.oos is not None:
            metrics |= {f"intent_{k}": v for k, v in oos.detection_metrics(
                intent_logits, np.asarray(intent_gold), self.oos, self.intent_oos_id, self.intent_oos_answer).items()}  # fmt: skip
        self._write_reports(gold, predicted, intent_gold, intent_predicted, out_dir, split)
        return {"num_examples": len(ds), **unseen.metrics(split), **metrics}

    # --- export
    def verification_texts(self, run, split: str) -> tuple[list[str], list[str] | None]:
        # Only the words are compared: tags the run never saw are kept, whatever unseen_labels says.
        ds = load_tagging_eval_split(self.config.data, self.args, split, self.labels, self.intents,
                                     Unseen.of("as_wrong"))  # fmt: skip
        return [" ".join(words) for words in ds["words"]], None

    def verification_outputs(self, run, texts, pairs, batch_size: int = 64) -> dict[str, Any]:
        """Word-level `slot_logits` (NaN past a query's words) and, for the joint task, `intent_logits`."""
        outs = self.infer(run, [split_words(t)[0] for t in texts], batch_size)
        result: dict[str, Any] = {"slot_logits": self._stack(outs)}
        if self.with_intent:
            result["intent_logits"] = np.stack([o.intent_logits for o in outs])
        return result


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class IntentSlotsTask(SlotsTask):
    """Joint intent + slots on one encoder (JointBERT): intent head on [CLS], slot head on every token."""

    model_class = AutoModelForIntentAndSlots
    default_metric = "exact_match"
    with_intent = True
    card_tags = ("intent-classification", "slot-filling")
    card_metrics = {
        "slot_f1": ("f1", "Slot F1 (entity-level)", 100.0),
        "intent_accuracy": ("accuracy", "Intent accuracy", 100.0),
        "exact_match": ("exact_match", "Exact match (intent and all slots)", 100.0),
    }
    report_columns = [("intent_accuracy", "intent acc %", 100.0), ("slot_f1", "slot F1 %", 100.0),
                      ("exact_match", "exact match %", 100.0)]  # fmt: skip

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        # Both label columns must reach compute_metrics (and the eval loss); PeftModel hides them from Trainer's
        # signature inspection, so they are named explicitly (see NOTES.md).
        if config.training.label_names in (None, ["labels"]):
            config.training.label_names = ["labels", "intent_labels"]

    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "intent_labels": self.intents, "prompt_tokens": prompt_length(self.config)}

    # distill_teacher: the intent head learns from a joint teacher's intent logits; the slot loss stays as it is.
    distill_output = "intent_logits"

    def distill_labels(self) -> list[str]:
        return list(self.intents or [])

    @property
    def trainer_class(self):
        return trainer_class_for(self.config.distill)

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        if not self.config.distill.distill_teacher:
            return super().trainer_kwargs(tokenizer)
        return distill.trainer_kwargs(self.config.distill, logits_key="intent_logits", labels_key="intent_labels")
