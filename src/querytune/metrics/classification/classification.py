"""Single-label classification metrics with optional out-of-scope handling, as a 🤗 `evaluate` module.

A thin wrapper over scikit-learn. With `oos_label_id`, it also reports in-scope accuracy (accuracy over the
examples whose gold label is in scope) and OOS recall, the two numbers of Larson et al. (2019) for CLINC150.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro-F1 and (optionally) in-scope accuracy / out-of-scope recall."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids.
    references: gold label ids.
    oos_label_id: id of the out-of-scope label, or None.
Returns:
    accuracy, macro_f1, macro_precision, macro_recall; with oos_label_id also in_scope_accuracy, oos_recall,
    oos_precision.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, oos_label_id=None):
        preds = np.asarray(predictions)
        refs = np.asarray(references)
        labels = np.union1d(refs, preds)
        p, r, f, _ = precision_recall_fscore_support(refs, preds, labels=labels, average="macro", zero_division=0)
        out = {
            "accuracy": float(accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
            "macro_precision": float(p),
            "macro_recall": float(r),
        }
        if oos_label_id is not None:
            in_scope = refs != oos_label_id
            oos = ~in_scope
            out["in_scope_accuracy"] = float((preds[in_scope] == refs[in_scope]).mean()) if in_scope.any() else 0.0
            out["oos_recall"] = float((preds[oos] == oos_label_id).mean()) if oos.any() else 0.0
            predicted_oos = preds == oos_label_id
            out["oos_precision"] = float((refs[predicted_oos] == oos_label_id).mean()) if predicted_oos.any() else 0.0
        return out
