"""Sequence classification of queries: intent detection (with out-of-scope) and any text classification."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from datasets import DatasetDict
from sklearn.metrics import classification_report, confusion_matrix
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, EvalPrediction

from querytune import distill
from querytune.batching import encoded_batches
from querytune.data import UnseenLabels, append_rows
from querytune.errors import ConfigError
from querytune.metrics import load_metric
from querytune.progress import progress
from querytune.tasks.base import Task
from querytune.tasks.classification.data import load_classification_splits, load_eval_split
from querytune.tasks.shared import oos
from querytune.tasks.shared.reports import most_confused_pairs, plot_confusions
from querytune.tasks.shared.trainers import trainer_class_for

logger = logging.getLogger(__name__)


class ClassificationTask(Task):
    """Data, preprocessing, model class, collator and metrics for single-label classification."""

    model_class = AutoModelForSequenceClassification
    peft_task_type = peft.TaskType.SEQ_CLS
    # The metric that decides the best checkpoint when the experiment does not say.
    default_metric = "accuracy"
    distill_output = "logits"  # distill_teacher: the student learns from the teacher's logits
    card_tags = ("intent-classification",)
    card_metrics = {
        "accuracy": ("accuracy", "Accuracy", 100.0),
        "macro_f1": ("f1", "Macro F1", 100.0),
        "in_scope_accuracy": ("accuracy", "In-scope accuracy", 100.0),
        "oos_recall": ("recall", "Out-of-scope recall", 100.0),
        "oos_precision": ("precision", "Out-of-scope precision", 100.0),
        "oos_auroc": ("roc_auc", "Out-of-scope AUROC", 100.0),
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        self.oos: oos.OosDetector | None = None  # chosen on validation at the end of training, saved in the label map

    report_columns = [
        ("in_scope_accuracy", "in-scope acc %", 100.0),
        ("oos_recall", "OOS recall %", 100.0),
        ("accuracy", "accuracy %", 100.0),
        ("macro_f1", "macro-F1 %", 100.0),
        ("oos_auroc", "OOS AUROC %", 100.0),
    ]
    report_shadowed = {"accuracy": "in_scope_accuracy"}  # with OOS detection, accuracy mixes the two

    # --- data
    def load_data(self) -> DatasetDict:
        self.unseen = UnseenLabels(self.config.data.unseen_labels)
        splits, self.labels = load_classification_splits(self.config.data, self.config.training.seed, self.unseen,
                                                         self.config.section("oos").oos_detector)  # fmt: skip
        return splits

    def label_info(self) -> dict[str, Any]:
        """What is saved as label_map.json and restored by `set_label_info` when a run is loaded."""
        info: dict[str, Any] = {"labels": self.labels, "label2id": {label: i for i, label in enumerate(self.labels)}}
        if self.oos is not None:
            info["oos_detector"] = {**self.oos.to_dict(), "oos_label": self.config.data.oos_label}
        return info

    def set_label_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
        detector = dict(info.get("oos_detector") or {})
        detector.pop("oos_label", None)
        self.oos = oos.OosDetector.from_dict(detector) if detector else None

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        """Truncate to max_seq_length and keep only model inputs; padding happens per batch in the collator."""
        data, max_len = self.config.data, self.config.model.max_length(tokenizer)
        padding = "max_length" if self.config.model.pad_to_max_length else False

        def texts_of(batch: dict[str, list]) -> tuple[list[str], list[str] | None]:
            pair = batch[data.text_pair_column] if data.text_pair_column else None
            return [t if t is not None else "" for t in batch[data.text_column]], pair

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(*texts_of(batch), truncation=True, max_length=max_len, padding=padding)
            out["labels"] = batch["labels"]
            if distill.TEACHER_COLUMN in batch:
                out[distill.TEACHER_COLUMN] = batch[distill.TEACHER_COLUMN]
            return out

        if self.config.distill.distill_teacher:  # the teacher's logits, once, as a column of the train split
            splits = DatasetDict(splits)
            splits["train"] = distill.add_teacher_logits(splits["train"], self.config.distill.distill_teacher,
                                                         self.distill_output, lambda task: task.distill_labels(),
                                                         self.labels, texts_of)  # fmt: skip

        return DatasetDict(
            {
                name: ds.map(
                    encode,
                    batched=True,
                    remove_columns=ds.column_names,
                    num_proc=data.preprocessing_num_workers,
                    desc=f"tokenising {name}",
                )
                for name, ds in splits.items()
            }
        )

    @property
    def trainer_class(self):
        return trainer_class_for(self.config.distill)

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        return distill.trainer_kwargs(self.config.distill) if self.config.distill.distill_teacher else {}

    def collator(self, tokenizer):
        mixed = self.config.training.fp16 or self.config.training.bf16
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed else None)

    # --- metrics
    @property
    def oos_id(self) -> int | None:
        """The trained out-of-scope class, if the labels have one."""
        oos_label = self.config.data.oos_label
        return self.labels.index(oos_label) if oos_label in self.labels else None

    @property
    def oos_answer(self) -> int:
        """The id of the answer for rejected queries: the OOS class, or one past the labels when train has none."""
        return self.oos_id if self.oos_id is not None else len(self.labels)

    @property
    def answer_names(self) -> list[str]:
        """Label names by predicted id, the answer for rejected queries included."""
        return (
            self.labels if self.oos_id is not None or self.oos is None else [*self.labels, self.config.data.oos_label]
        )

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """Argmax metrics during training (model selection); `scored` applies the OOS detector afterwards."""
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        preds = np.argmax(logits, axis=-1)
        return load_metric("classification").compute(
            predictions=preds, references=prediction.label_ids, oos_label_id=self.oos_id
        )

    def choose_oos_threshold(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """Pick the detector's threshold on the validation split's logits (never on test)."""
        detection = self.config.section("oos")
        if detection.oos_detector == "none":
            return
        self.oos = oos.choose_threshold(logits, labels, detection.oos_detector, self.oos_id,
                                        detection.oos_threshold_rule, detection.oos_max_in_scope_drop,
                                        detection.oos_in_scope_recall)  # fmt: skip
        logger.info("OOS detector %s: threshold %.5g by rule %s on validation (%s)", self.oos.detector,
                    self.oos.threshold, self.oos.rule, json.dumps(self.oos.chosen_on))  # fmt: skip

    def scored(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics of a split with the OOS detector applied (the argmax ones, prefixed `argmax_`, next to them)."""
        argmax = self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
        if self.oos is None:
            return argmax
        preds = oos.predict_ids(logits, self.oos, self.oos_answer)
        metrics = load_metric("classification").compute(predictions=preds, references=labels,
                                                        oos_label_id=self.oos_answer)  # fmt: skip
        metrics |= oos.detection_metrics(logits, labels, self.oos, self.oos_id, self.oos_answer)
        metrics["oos_threshold"] = self.oos.threshold
        return {**metrics, **{f"argmax_{k}": v for k, v in argmax.items()}}

    def evaluate_trained(self, trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """Score the trained model on one split; on validation, first choose the OOS threshold."""
        prefix = "eval" if role == "validation" else "test"
        result = trainer.predict(dataset, metric_key_prefix=prefix)
        logits = result.predictions[0] if isinstance(result.predictions, tuple) else result.predictions
        if role == "validation":
            self.choose_oos_threshold(logits, result.label_ids)
        if self.oos is None:
            metrics = result.metrics
        else:
            kept = {k: v for k, v in result.metrics.items() if k.startswith(f"{prefix}_") and
                    k.removeprefix(f"{prefix}_") in ("loss", "runtime", "samples_per_second", "steps_per_second")}  # fmt: skip
            metrics = {**kept, **{f"{prefix}_{k}": v for k, v in self.scored(logits, result.label_ids).items()}}
        if trainer.is_world_process_zero():
            self.write_reports(logits, result.label_ids, out_dir, role)
        unseen = getattr(self, "unseen", None)  # what unseen_labels did to the split (`num_dropped_unseen` and so on)
        return {**metrics, **{f"{prefix}_{k}": v for k, v in (unseen.metrics(role) if unseen else {}).items()}}

    def write_reports(self, logits: np.ndarray, label_ids: np.ndarray, out_dir: Path, split: str) -> None:
        """Per-label precision/recall/F1 (JSON and text) and a confusion plot readable at 150 classes, with the OOS
        detector applied; its trade-off curve when there is one."""
        logits = logits[0] if isinstance(logits, tuple) else logits  # Trainer's predictions: logits first
        preds = oos.predict_ids(logits, self.oos, self.oos_answer)
        names = self.answer_names
        ids = list(range(len(names)))
        kwargs = {"labels": ids, "target_names": names, "zero_division": 0, "digits": 4}
        report = classification_report(label_ids, preds, output_dict=True, **kwargs)
        (out_dir / f"{split}_report.json").write_text(json.dumps(report, indent=2))
        (out_dir / f"{split}_report.txt").write_text(classification_report(label_ids, preds, **kwargs))
        matrix = confusion_matrix(label_ids, preds, labels=ids)
        pairs = most_confused_pairs(matrix, names, k=25)
        (out_dir / f"{split}_confused_pairs.json").write_text(json.dumps(pairs, indent=2))
        plot_confusions(matrix, names, pairs, out_dir / f"{split}_confusion.png", title=f"{split} split")
        if self.oos is not None and self.oos.detector != "none":
            oos.plot_tradeoff(logits, label_ids, self.oos, out_dir / f"{split}_oos_tradeoff.png",
                              title=f"{self.oos.detector} on the {split} split")  # fmt: skip

    # --- augmentation
    def augment_unsupported(self) -> str | None:
        return None

    def augment_examples(self, split) -> list:
        from querytune.augment.base import Example

        texts, ids = split[self.config.data.text_column], split["labels"]
        return [Example((text or "").split(), self.labels[i] if i >= 0 else "", source=row)
                for row, (text, i) in enumerate(zip(texts, ids, strict=True))]  # fmt: skip

    def augmented_train(self, train, examples: list):
        label2id = {label: i for i, label in enumerate(self.labels)}
        column = self.config.data.text_column
        return append_rows(train, [{**train[ex.source], column: ex.text, "labels": label2id[ex.label]}
                                   for ex in examples])  # fmt: skip

    def augment_agreement(self, run, examples: list) -> list[bool]:
        unknown = sorted({ex.label for ex in examples} - set(self.answer_names))
        if unknown:
            raise ConfigError(f"augment_filter_run {run.run_dir}: the run does not know the label(s) {unknown[:10]}")
        predictions = self.predict(run, [ex.text for ex in examples], top_k=1)
        return [p["label"] == ex.label for p, ex in zip(predictions, examples, strict=True)]

    # --- inference on a loaded run
    @torch.inference_mode()
    def logits(self, run, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        """Logits for many queries; batches are formed by token count so little time goes to padding."""
        out: list[np.ndarray | None] = [None] * len(texts)
        batches = encoded_batches(run.tokenizer, texts, pairs, batch_size, self.config.model.max_length(run.tokenizer))
        for idx, enc in progress(batches, "scoring queries", total=-(-len(texts) // batch_size)):
            logits = run.model(**enc.to(run.device)).logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = logits[row]
        return np.stack(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64, **inputs) -> list[dict[str, Any]]:
        """Label, score and the top-k labels with probabilities for each query.

        With an OOS detector, every result carries its `in_scope_score`; a query scoring under the threshold is
        answered with `oos_label` (`"oos": true`) and its score is that in-scope score.
        """
        logits = self.logits(run, texts, batch_size=batch_size)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        in_scope = oos.scores(logits, self.oos.detector, self.oos.oos_id) if self.oos else None
        answers = oos.predict_ids(logits, self.oos, self.oos_answer)
        names = self.answer_names
        results = []
        for row, (text, p) in enumerate(zip(texts, probs, strict=True)):
            top = np.argsort(p)[::-1][: max(1, top_k)]
            answer = int(answers[row])
            result: dict[str, Any] = {"query": text, "label": names[answer]}
            rejected = in_scope is not None and answer == self.oos_answer and in_scope[row] < self.oos.threshold
            result["score"] = round(float(in_scope[row] if rejected else p[answer]), 6)
            if in_scope is not None:
                result |= {"oos": bool(answer == self.oos_answer), "in_scope_score": round(float(in_scope[row]), 6)}
            result["top_k"] = [{"label": self.labels[i], "score": round(float(p[i]), 6)} for i in top]
            results.append(result)
        return results

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        """Score a loaded run on one split of `self.config.data` with the run's label map and OOS detector; write
        the reports."""
        data = self.config.data
        unseen = UnseenLabels(data.unseen_labels)
        ds = load_eval_split(data, split, self.labels, unseen)
        pairs = ds[data.text_pair_column] if data.text_pair_column else None
        logits = self.logits(run, [t or "" for t in ds[data.text_column]], pairs, batch_size=batch_size)
        labels = np.asarray(ds["labels"])
        metrics = self.scored(logits, labels)
        self.write_reports(logits, labels, out_dir, split)
        return {"num_examples": len(ds), **unseen.metrics(split), **metrics}

    # --- export
    def verification_texts(self, run, split: str) -> tuple[list[str], list[str] | None]:
        data = self.config.data
        ds = load_eval_split(data, split, self.labels, UnseenLabels("as_wrong"))  # only the texts are compared
        pairs = list(ds[data.text_pair_column]) if data.text_pair_column else None
        return [t or "" for t in ds[data.text_column]], pairs

    def verification_outputs(self, run, texts, pairs, batch_size: int = 64) -> dict[str, Any]:
        return {"logits": self.logits(run, texts, pairs, batch_size=batch_size)}
