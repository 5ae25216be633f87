"""Out-of-scope detection: answer "none of these" for queries an intent model was not built for.

A detector turns a query's logits into an *in-scope score* `s` (higher: more in scope) and the model abstains
(answers `oos_label`) when `s < threshold`; otherwise it answers the best in-scope intent.

- `msp`: the maximum softmax probability over the in-scope intents (Hendrycks & Gimpel 2017).
- `energy`: the log-sum-exp of the in-scope logits, i.e. minus the free energy (Liu et al. 2020).
- `oos_class`: one minus the probability of the trained out-of-scope class (needs an OOS class in train).
- `none`: plain argmax over every label (the OOS class, if any, is just one more class).

The threshold is chosen on the validation split only, by `oos_threshold_rule`:

- `in_scope_drop`: the threshold with the highest validation OOS recall among those that keep validation in-scope
  accuracy within `oos_max_in_scope_drop` points of the argmax model's (needs OOS examples in validation).
- `max_sum`: the threshold that maximises validation in-scope accuracy + OOS recall (needs OOS examples).
- `in_scope_recall`: the threshold that keeps `oos_in_scope_recall` of the in-scope validation queries (the
  rule for corpora without any OOS example: it only needs in-scope data).
- `auto`: `in_scope_drop` when validation holds OOS examples, else `in_scope_recall`.

A rejected in-scope query counts as wrong in in-scope accuracy; an OOS query counts as recalled when it is
answered with `oos_label` (by the threshold, or by the argmax landing on the OOS class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score

DETECTORS = ("none", "msp", "energy", "oos_class")
RULES = ("auto", "in_scope_drop", "max_sum", "in_scope_recall")


@dataclass
class OosDetector:
    """A detector with its threshold, as saved in the run's label map."""

    detector: str
    threshold: float
    rule: str  # the rule that chose the threshold (auto resolved)
    oos_id: int | None  # the trained OOS class, if the labels have one
    chosen_on: dict[str, Any]  # the validation figures at the threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, info: dict[str, Any]) -> OosDetector:
        return cls(**info)


def in_scope_ids(num_labels: int, oos_id: int | None) -> np.ndarray:
    return np.array([i for i in range(num_labels) if i != oos_id], dtype=np.int64)


def scores(logits: np.ndarray, detector: str, oos_id: int | None) -> np.ndarray:
    """The in-scope score of each row of logits (higher: more in scope)."""
    logits = np.asarray(logits, dtype=np.float64)
    keep = in_scope_ids(logits.shape[-1], oos_id)
    if detector == "msp":
        return softmax(logits, axis=-1)[:, keep].max(axis=-1)
    if detector == "energy":
        return logsumexp(logits[:, keep], axis=-1)
    if detector == "oos_class":
        if oos_id is None:
            raise ValueError("oos_detector 'oos_class' needs an out-of-scope class in the train labels")
        return 1.0 - softmax(logits, axis=-1)[:, oos_id]
    raise ValueError(f"oos_detector must be one of {DETECTORS[1:]} to score, got {detector!r}")


def best_in_scope(logits: np.ndarray, oos_id: int | None) -> np.ndarray:
    """The best in-scope label of each row (the answer when the query is accepted)."""
    keep = in_scope_ids(np.shape(logits)[-1], oos_id)
    return keep[np.argmax(np.asarray(logits)[:, keep], axis=-1)]


def predict_ids(logits: np.ndarray, det: OosDetector | None, oos_answer: int) -> np.ndarray:
    """Predicted label ids with the detector applied; `oos_answer` is the id answered for rejected queries (the OOS
    class, or one past the last label when train has none)."""
    logits = np.asarray(logits)
    if det is None or det.detector == "none":
        return np.argmax(logits, axis=-1)
    pred = best_in_scope(logits, det.oos_id)
    return np.where(scores(logits, det.detector, det.oos_id) < det.threshold, oos_answer, pred)


def _curves(s: np.ndarray, correct: np.ndarray, is_oos: np.ndarray):
    """For each candidate threshold (the distinct scores, ascending, plus +inf): in-scope accuracy and OOS recall.

    A query is accepted when s >= threshold. `correct` says whether the accepted answer of an in-scope query is right.
    """
    thresholds = np.unique(s)
    thresholds = np.append(thresholds, np.inf)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Number of queries with score < t, split by kind: searchsorted on the sorted scores.
    below = np.searchsorted(s_sorted, thresholds, side="left")
    ins = ~is_oos[order]
    ins_correct = (correct & ~is_oos)[order]
    cum_ins_correct = np.concatenate([[0], np.cumsum(ins_correct)])
    cum_oos = np.concatenate([[0], np.cumsum(~ins)])
    n_in, n_oos = int(ins.sum()), int((~ins).sum())
    accepted_correct = cum_ins_correct[-1] - cum_ins_correct[below]
    in_acc = accepted_correct / max(n_in, 1)
    oos_rec = cum_oos[below] / max(n_oos, 1)
    return thresholds, in_acc, oos_rec


def choose_threshold(logits: np.ndarray, labels: np.ndarray, detector: str, oos_id: int | None, rule: str,
                     max_in_scope_drop: float, in_scope_recall: float) -> OosDetector:  # fmt: skip
    """Pick the threshold on (validation) logits and gold labels by `rule`; see the module docstring."""
    if detector == "none":
        return OosDetector("none", float("-inf"), "none", oos_id, {})
    labels = np.asarray(labels)
    s = scores(logits, detector, oos_id)
    is_oos = labels == oos_id if oos_id is not None else np.zeros(len(labels), dtype=bool)
    has_oos = bool(is_oos.any())
    if rule == "auto":
        rule = "in_scope_drop" if has_oos else "in_scope_recall"
    if rule in ("in_scope_drop", "max_sum") and not has_oos:
        raise ValueError(f"oos_threshold_rule {rule!r} needs out-of-scope examples in the validation split; it has "
                         "none: use oos_threshold_rule in_scope_recall (or auto)")  # fmt: skip
    correct = best_in_scope(logits, oos_id) == labels
    thresholds, in_acc, oos_rec = _curves(s, correct, is_oos)
    if rule == "in_scope_recall":
        ins_scores = np.sort(s[~is_oos])
        # keep the top `in_scope_recall` of in-scope scores: the threshold is the score at the cut
        cut = int(np.floor((1.0 - in_scope_recall) * len(ins_scores)))
        threshold = float(ins_scores[min(cut, len(ins_scores) - 1)])
    elif rule == "max_sum":
        threshold = float(thresholds[int(np.argmax(in_acc + oos_rec))])
    elif rule == "in_scope_drop":
        base = float(np.mean((np.argmax(logits, axis=-1) == labels)[~is_oos]))  # the argmax model's in-scope acc
        ok = in_acc >= base - max_in_scope_drop / 100 - 1e-12
        best = int(np.flatnonzero(ok)[np.argmax(oos_rec[ok])]) if ok.any() else 0
        threshold = float(thresholds[best])
    else:
        raise ValueError(f"oos_threshold_rule must be one of {RULES}, got {rule!r}")
    accepted = s >= threshold
    chosen = {
        "num_examples": int(len(labels)),
        "num_oos": int(is_oos.sum()),
        "in_scope_accuracy": float(np.mean((accepted & correct)[~is_oos])) if (~is_oos).any() else 0.0,
        "in_scope_acceptance": float(np.mean(accepted[~is_oos])) if (~is_oos).any() else 0.0,
        "oos_recall": float(np.mean(~accepted[is_oos])) if has_oos else None,
    }
    if rule == "in_scope_drop":
        chosen["max_in_scope_drop_points"] = max_in_scope_drop
    if rule == "in_scope_recall":
        chosen["target_in_scope_recall"] = in_scope_recall
    return OosDetector(detector, threshold, rule, oos_id, chosen)


def detection_metrics(logits: np.ndarray, labels: np.ndarray, det: OosDetector, oos_id: int | None,
                      oos_answer: int) -> dict[str, float]:  # fmt: skip
    """OOS precision / recall / F1 with the detector, and the threshold-free AUROC and FPR at 95% in-scope recall.

    Needs OOS examples among `labels` (gold `oos_answer`); returns {} otherwise.
    """
    labels = np.asarray(labels)
    is_oos = labels == oos_answer
    if not is_oos.any() or det.detector == "none":
        return {}
    pred = predict_ids(logits, det, oos_answer)
    said_oos = pred == oos_answer
    tp = float((said_oos & is_oos).sum())
    precision = tp / max(float(said_oos.sum()), 1.0)
    recall = tp / float(is_oos.sum())
    s = scores(logits, det.detector, det.oos_id)
    in_scores = np.sort(s[~is_oos])
    at95 = in_scores[int(np.floor(0.05 * len(in_scores)))] if len(in_scores) else 0.0
    return {
        "oos_precision": precision,
        "oos_recall": recall,
        "oos_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "oos_auroc": float(roc_auc_score(~is_oos, s)) if (~is_oos).any() else 0.0,
        # OOS queries that a threshold keeping 95% of in-scope queries would still accept
        "oos_fpr_at_95_in_scope_recall": float(np.mean(s[is_oos] >= at95)),
    }


def plot_tradeoff(logits: np.ndarray, labels: np.ndarray, det: OosDetector, path: Path, title: str) -> None:
    """In-scope accuracy against OOS recall over every threshold, with the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    oos_id = det.oos_id
    is_oos = labels == oos_id if oos_id is not None else np.zeros(len(labels), dtype=bool)
    s = scores(logits, det.detector, oos_id)
    correct = best_in_scope(logits, oos_id) == labels
    _, in_acc, oos_rec = _curves(s, correct, is_oos)
    accepted = s >= det.threshold
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(100 * oos_rec, 100 * in_acc, color="tab:blue", label=f"{det.detector} over all thresholds")
    ax.scatter([100 * np.mean(~accepted[is_oos]) if is_oos.any() else 0.0],
               [100 * np.mean((accepted & correct)[~is_oos])], color="tab:red", zorder=3,
               label=f"chosen on validation ({det.rule}): {det.threshold:.4g}")  # fmt: skip
    ax.set_xlabel("OOS recall %")
    ax.set_ylabel("in-scope accuracy %")
    ax.set_ylim(max(0, 100 * float(np.max(in_acc)) - 15), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
