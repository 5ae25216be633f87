"""The options of the relevance tasks (`rerank`, `retrieval`): grades, objectives, the catalogue and the query split.

Flat keys, cheap import (config parsing reads this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

RANKING_TASKS = ("rerank", "retrieval")
RERANK_OBJECTIVES = ("regression", "binary", "graded", "listwise")


@dataclass
class RankingArguments:
    """Relevance grades, the rerank objective and negatives, retrieval, the catalogue and the by-query split."""

    section: ClassVar[str] = "ranking"

    document_id_column: str | None = field(
        default=None,
        metadata={"help": "rerank / retrieval: column identifying a document (product_uid); default: its text."},
    )
    relevance_threshold: float = field(
        default=2.5,
        metadata={"help": "rerank / retrieval: a label >= this is relevant (binary objective, MRR, MAP, recall)."},
    )
    relevance_gain_offset: float = field(
        default=1.0, metadata={"help": "rerank / retrieval: nDCG gain is label minus this (Home Depot 1-3: 1)."}
    )
    rerank_objective: str = field(
        default="regression",
        metadata={"help": "rerank: 'regression' (MSE on the label), 'binary' (BCE on label >= relevance_threshold), "
                  "'graded' (BCE on the gain label - relevance_gain_offset scaled to [0, 1]) or 'listwise' (softmax "
                  "cross-entropy over each query's documents in a batch, target proportional to the gain; batches "
                  "are formed from whole queries)."},
    )  # fmt: skip
    rerank_negatives: int = field(
        default=0,
        metadata={"help": "rerank: add N unjudged catalogue documents per train and validation query, labelled "
                  "rerank_negative_label, so the model sees what it must push down (the judged pairs alone are "
                  "mostly relevant)."},
    )  # fmt: skip
    rerank_negative_source: str = field(
        default="mixed",
        metadata={"help": "rerank negatives: 'bm25' (drawn from the query's unjudged BM25 top retrieval_top_k, the "
                  "documents reranked at evaluation), 'random' (from the whole catalogue) or 'mixed' (half each)."},
    )  # fmt: skip
    rerank_negative_label: float | None = field(
        default=None, metadata={"help": "rerank negatives: their label; default the lowest label of the train split."}
    )
    rerank_first_stage: str = field(
        default="bm25",
        metadata={"help": "rerank evaluation: 'bm25' reranks the BM25 top retrieval_top_k over the whole catalogue; "
                  "'judged' reranks only the judged documents of each query (barely discriminates)."},
    )  # fmt: skip
    retrieval_top_k: int = field(
        default=100, metadata={"help": "rerank / retrieval: documents retrieved per query from the catalogue."}
    )
    retrieval_hard_negatives: bool = field(
        default=True,
        metadata={"help": "retrieval: add one judged non-relevant document of the same query per training pair."},
    )
    retrieval_temperature: float = field(
        default=0.05, metadata={"help": "retrieval: softmax temperature of the in-batch contrastive loss."}
    )
    catalogue_file: str | None = field(
        default=None,
        metadata={"help": "rerank / retrieval: the document collection searched at evaluation (csv/jsonl/parquet "
                  "with the document text and id columns); default: every document of the dataset."},
    )  # fmt: skip
    catalogue_cache_dir: str | None = field(
        default=None,
        metadata={"help": "retrieval: where catalogue embeddings are cached by model weights and catalogue "
                  "(default ~/.cache/querytune/catalogue)."},
    )  # fmt: skip
    ranking_split_seed: int = field(
        default=0,
        metadata={"help": "rerank / retrieval: salt of the by-query hash split used when the dataset has no "
                  "validation / test split (see querytune.ranking_data)."},
    )  # fmt: skip
    ranking_test_percentage: float = field(
        default=10.0,
        metadata={"help": "rerank / retrieval: % of queries held out as test when there is no test split."},
    )
    max_train_queries: int | None = field(
        default=None, metadata={"help": "rerank / retrieval: keep a seeded sample of N train queries."}
    )
    max_eval_queries: int | None = field(
        default=None, metadata={"help": "rerank / retrieval: keep a seeded sample of N validation and N test queries."}
    )

    def __post_init__(self) -> None:
        if self.rerank_objective not in RERANK_OBJECTIVES:
            raise ValueError(f"rerank_objective must be one of {RERANK_OBJECTIVES}, got {self.rerank_objective!r}")
        if self.rerank_negative_source not in ("bm25", "random", "mixed"):
            raise ValueError("rerank_negative_source must be 'bm25', 'random' or 'mixed', got "
                             f"{self.rerank_negative_source!r}")  # fmt: skip
        if self.rerank_negatives < 0:
            raise ValueError(f"rerank_negatives must be >= 0, got {self.rerank_negatives}")
        if self.rerank_first_stage not in ("bm25", "judged"):
            raise ValueError(f"rerank_first_stage must be 'bm25' or 'judged', got {self.rerank_first_stage!r}")
        for name in ("retrieval_top_k", "max_train_queries", "max_eval_queries"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be positive, got {self.retrieval_temperature}")

    def check(self, data) -> None:
        """Rules across sections (the common data options and the task)."""
        if (
            not 0 < self.ranking_test_percentage < 100
            or self.ranking_test_percentage + data.validation_split_percentage >= 100
        ):
            raise ValueError(
                f"ranking_test_percentage ({self.ranking_test_percentage}) must be in (0, 100) and leave train "
                f"queries beside validation_split_percentage ({data.validation_split_percentage})"
            )
        if data.task in RANKING_TASKS and not data.text_pair_column:
            raise ValueError(f"task {data.task!r} needs text_pair_column (the document text, e.g. product_title)")
        if data.task in RANKING_TASKS and (data.max_train_samples or data.max_eval_samples):
            raise ValueError(f"task {data.task!r} samples whole queries: use max_train_queries / max_eval_queries, "
                             "not max_train_samples / max_eval_samples")  # fmt: skip
