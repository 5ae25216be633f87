"""The options of the intent tasks' out-of-scope detection (`intent`, `text_classification` and the intent head of
`intent_slots`): which detector scores how in-scope a query is, and how its threshold is chosen on validation.
`oos_label` itself is a data key: which label means out-of-scope. Flat keys, cheap import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

DETECTORS = ("none", "msp", "energy", "oos_class")
RULES = ("auto", "in_scope_drop", "max_sum", "in_scope_recall")


@dataclass
class OosArguments:
    """Out-of-scope detection of an intent head."""

    section: ClassVar[str] = "oos"

    oos_detector: str = field(
        default="none",
        metadata={"help": "intent / intent_slots: out-of-scope detection. 'none' (argmax), 'msp' (max softmax "
                  "probability), 'energy' (log-sum-exp of the logits) or 'oos_class' (1 - P(oos class)); a query "
                  "scoring under a threshold chosen on the validation split is answered with oos_label."},
    )  # fmt: skip
    oos_threshold_rule: str = field(
        default="auto",
        metadata={"help": "How the OOS threshold is chosen on validation: 'in_scope_drop' (most OOS recall keeping "
                  "in-scope accuracy within oos_max_in_scope_drop points), 'max_sum' (in-scope accuracy + OOS "
                  "recall), 'in_scope_recall' (keep oos_in_scope_recall of in-scope queries; needs no OOS "
                  "examples) or 'auto' (in_scope_drop with OOS examples in validation, else in_scope_recall)."},
    )  # fmt: skip
    oos_max_in_scope_drop: float = field(
        default=0.5, metadata={"help": "in_scope_drop rule: in-scope accuracy points the threshold may cost."}
    )
    oos_in_scope_recall: float = field(
        default=0.95, metadata={"help": "in_scope_recall rule: share of in-scope validation queries kept."}
    )

    def __post_init__(self) -> None:
        if self.oos_detector not in DETECTORS:
            raise ValueError(f"oos_detector must be one of {DETECTORS}, got {self.oos_detector!r}")
        if self.oos_threshold_rule not in RULES:
            raise ValueError(f"oos_threshold_rule must be one of {RULES}, got {self.oos_threshold_rule!r}")
        if not 0 <= self.oos_max_in_scope_drop <= 100:
            raise ValueError(f"oos_max_in_scope_drop must be in [0, 100] points, got {self.oos_max_in_scope_drop}")
        if not 0 < self.oos_in_scope_recall <= 1:
            raise ValueError(f"oos_in_scope_recall must be in (0, 1], got {self.oos_in_scope_recall}")

    def check(self, data) -> None:
        """A detector answers `oos_label` for the queries it rejects: it needs one."""
        if self.oos_detector != "none" and not data.oos_label:
            raise ValueError(f"oos_detector {self.oos_detector!r} needs oos_label: the label answered for rejected "
                             "queries (e.g. oos)")  # fmt: skip
