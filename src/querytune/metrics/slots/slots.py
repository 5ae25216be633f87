"""Slot tagging metrics as a 🤗 `evaluate` module: seqeval entity-level scores plus a span-error breakdown.

Inputs are word-level BIO tag sequences. Precision, recall and F1 are seqeval's entity-level micro averages, in its
default (conlleval) mode or, with `mode="strict"`, its strict IOB2 mode. Token accuracy is the share of words whose
tag is right.

Span errors (each gold and each predicted span is used at most once, matched in this order):
- correct: same type, same boundaries (seqeval's true positives);
- wrong_type: same boundaries, another type;
- wrong_boundary: same type, overlapping but different boundaries;
- wrong_type_and_boundary: overlapping, another type and other boundaries;
- missed: a gold span no prediction overlaps;
- spurious: a predicted span no gold span overlaps.
So gold spans = correct + wrong_type + wrong_boundary + wrong_type_and_boundary + missed, and predicted spans =
correct + the same three + spurious.

With `intent_predictions` / `intent_references` it adds intent accuracy and sentence-level exact match (the intent
and every word's tag right: JointBERT's "semantic frame accuracy").
"""

from collections import Counter

import datasets
import evaluate
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2, Entities

_DESCRIPTION = "Entity-level slot precision/recall/F1 (seqeval), token accuracy, span errors, intent and exact match."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted BIO tags, one list of strings per sentence.
    references: gold BIO tags, same lengths.
    mode: None (seqeval default, conlleval rules) or "strict" (IOB2: an I-X that opens a span is no span).
    intent_predictions, intent_references: optional intent ids or names, one per sentence.
    report: also return `report` (per entity type precision/recall/F1/support), `report_text` and
        `confused_types` (gold type -> predicted type counts of wrong_type errors).
Returns:
    precision, recall, f1, token_accuracy, num_gold_spans, num_predicted_spans, correct, wrong_type,
    wrong_boundary, wrong_type_and_boundary, missed, spurious; with intents also intent_accuracy and exact_match.
"""
ERROR_KINDS = ("wrong_type", "wrong_boundary", "wrong_type_and_boundary", "missed", "spurious")


def spans(tags, strict):
    """(type, start, end) word spans, end exclusive, read exactly as seqeval reads them."""
    if strict:
        return [(e.tag, e.start, e.end) for e in Entities([list(tags)], IOB2).entities[0]]
    return [(label, start, end + 1) for label, start, end in get_entities(list(tags))]


def span_errors(gold, predicted):
    """Classify one sentence's spans; returns the counts and the (gold type, predicted type) of wrong_type errors."""
    counts = Counter()
    confused = Counter()
    gold_left = sorted(set(gold) - set(predicted), key=lambda s: (s[1], s[2]))
    pred_left = sorted(set(predicted) - set(gold), key=lambda s: (s[1], s[2]))
    counts["correct"] = len(set(gold) & set(predicted))

    def overlaps(a, b):
        return a[1] < b[2] and b[1] < a[2]

    rules = (
        ("wrong_type", lambda g, p: (g[1], g[2]) == (p[1], p[2])),
        ("wrong_boundary", lambda g, p: g[0] == p[0] and overlaps(g, p)),
        ("wrong_type_and_boundary", overlaps),
    )
    for kind, matches in rules:
        for g in list(gold_left):
            p = next((p for p in pred_left if matches(g, p)), None)
            if p is not None:
                counts[kind] += 1
                if kind == "wrong_type":
                    confused[(g[0], p[0])] += 1
                gold_left.remove(g)
                pred_left.remove(p)
    counts["missed"] = len(gold_left)
    counts["spurious"] = len(pred_left)
    return counts, confused


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Slots(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, mode=None, intent_predictions=None, intent_references=None,
                 report=False):  # fmt: skip
        if mode not in (None, "strict"):
            raise ValueError(f"mode must be None or 'strict', got {mode!r}")
        strict = mode == "strict"
        for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
            if len(p) != len(r):
                raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(r)} gold tags")
        words = sum(len(r) for r in references)
        right = sum(
            p == r for pred, ref in zip(predictions, references, strict=True) for p, r in zip(pred, ref, strict=True)
        )
        counts, confused = Counter(), Counter()
        gold_spans = pred_spans = 0
        for pred, ref in zip(predictions, references, strict=True):
            g, p = spans(ref, strict), spans(pred, strict)
            gold_spans += len(g)
            pred_spans += len(p)
            c, t = span_errors(g, p)
            counts.update(c)
            confused.update(t)
        kwargs = {"mode": mode, "scheme": IOB2} if strict else {}
        if gold_spans or pred_spans:
            table = classification_report(references, predictions, output_dict=True, zero_division=0, **kwargs)
            micro = table.pop("micro avg")
        else:  # seqeval's strict report fails without a single span; nothing to score is 0, as zero_division says
            table, micro = {}, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
        out = {
            "precision": float(micro["precision"]),
            "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]),
            "token_accuracy": right / words if words else 0.0,
            "num_gold_spans": gold_spans,
            "num_predicted_spans": pred_spans,
            "correct": counts["correct"],
            **{kind: counts[kind] for kind in ERROR_KINDS},
        }
        if intent_predictions is not None or intent_references is not None:
            if (
                intent_predictions is None
                or intent_references is None
                or not (len(intent_predictions) == len(intent_references) == len(references))
            ):
                raise ValueError("intent_predictions and intent_references need one entry per sentence")
            intent_right = [p == r for p, r in zip(intent_predictions, intent_references, strict=True)]
            out["intent_accuracy"] = sum(intent_right) / len(intent_right) if intent_right else 0.0
            frames = [
                ok and list(p) == list(r) for ok, p, r in zip(intent_right, predictions, references, strict=True)
            ]
            out["exact_match"] = sum(frames) / len(frames) if frames else 0.0
        if report:
            out["report"] = {
                # seqeval's macro average over no types is NaN, which is not JSON
                name: {k: int(v) if k == "support" else (None if v != v else float(v)) for k, v in row.items()}
                for name, row in {**table, "micro avg": micro}.items()
            }
            out["report_text"] = (
                classification_report(references, predictions, digits=4, zero_division=0, **kwargs)
                if table
                else "no slot in the gold or the predicted tags\n"
            )
            out["confused_types"] = [{"gold": g, "predicted": p, "count": n} for (g, p), n in confused.most_common()]
        return out
