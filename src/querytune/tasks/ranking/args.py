"""The options of the relevance tasks (`rerank`, `retrieval`): grades, objectives, the catalogue and the query split.

Flat keys, cheap import (config parsing reads this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from querytune.tasks import TaskInput

RANKING_TASKS = ("rerank", "retrieval")
RERANK_OBJECTIVES = ("regression", "binary", "graded", "listwise")
FIRST_STAGES = ("bm25", "judged", "dense", "hybrid")
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("auto", "rrf", "min-max", "z-score")
NEGATIVE_SOURCES = ("bm25", "dense", "mixed")


@dataclass
class RankingArguments:
    """Relevance grades, the rerank objective and negatives, retrieval, the catalogue and the by-query split."""

    paths: ClassVar[tuple[str, ...]] = (
        "rerank_retrieval_run",
        "retrieval_teacher",
        "catalogue_file",
        "catalogue_cache_dir",
    )  # local paths: saved resolved, so a run loads anywhere

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
        metadata={"help": "rerank evaluation and search: 'bm25' reranks the BM25 top retrieval_top_k over the whole "
                  "catalogue; 'dense' / 'hybrid' rerank the top retrieval_top_k of the retrieval run "
                  "rerank_retrieval_run (hybrid: with the fusion saved in it); 'judged' reranks only the judged "
                  "documents of each query (barely discriminates)."},
    )  # fmt: skip
    rerank_interpolation: bool = field(
        default=False,
        metadata={"help": "rerank evaluation over a first stage (bm25 / dense / hybrid): rank by a fusion of the first "
                  "stage's and the cross-encoder's scores instead of the cross-encoder's alone; the fusion "
                  "(retrieval_fusion: RRF, min-max or z-score with its weight) is chosen on the validation queries "
                  "only and saved with the evaluation as rerank_interpolation.json."},
    )  # fmt: skip
    rerank_retrieval_run: str | None = field(
        default=None,
        metadata={"help": "rerank with rerank_first_stage dense / hybrid: a finished retrieval run (or its export) "
                  "whose top retrieval_top_k the cross-encoder reorders."},
    )  # fmt: skip
    retrieval_top_k: int = field(
        default=100, metadata={"help": "rerank / retrieval: documents retrieved per query from the catalogue."}
    )
    retrieval_mode: str = field(
        default="dense",
        metadata={"help": "retrieval: how the run searches: 'dense' (the bi-encoder), 'bm25', or 'hybrid' (BM25 and "
                  "dense fused; the fusion and its weight are chosen on the validation queries at the end of "
                  "training and saved in the run as retrieval_fusion.json)."},
    )  # fmt: skip
    retrieval_fusion: str = field(
        default="auto",
        metadata={"help": "retrieval hybrid: 'rrf' (reciprocal rank fusion, k chosen), 'min-max' / 'z-score' "
                  "(weighted sum of normalised scores, weight chosen), or 'auto' (the best of the three on the "
                  "validation queries' nDCG@10); fused with ranx."},
    )  # fmt: skip
    retrieval_fusion_depth: int | None = field(
        default=None,
        metadata={"help": "retrieval hybrid: documents taken from each of BM25 and dense before fusing; default "
                  "retrieval_top_k."},
    )  # fmt: skip
    retrieval_index: str = field(
        default="exact",
        metadata={"help": "retrieval: 'exact' (brute-force cosine over the catalogue embeddings) or 'faiss' (an "
                  "approximate nearest-neighbour index, for catalogues too large to search exactly)."},
    )  # fmt: skip
    retrieval_faiss_factory: str = field(
        default="HNSW32",
        metadata={"help": "retrieval_index faiss: the faiss index_factory string (inner product), e.g. 'HNSW32' or "
                  "'IVF4096,Flat'."},
    )  # fmt: skip
    retrieval_faiss_params: str = field(
        default="efSearch=128",
        metadata={"help": "retrieval_index faiss: search-time parameters (faiss ParameterSpace), e.g. "
                  "'efSearch=128' (HNSW) or 'nprobe=16' (IVF)."},
    )  # fmt: skip
    retrieval_hard_negatives: bool = field(
        default=True,
        metadata={"help": "retrieval: add one judged non-relevant document of the same query per training pair."},
    )
    retrieval_negatives: int = field(
        default=0,
        metadata={"help": "retrieval: unjudged catalogue documents mined per train / validation query as "
                  "negatives of each of its pairs (never a document judged for the query)."},
    )  # fmt: skip
    retrieval_negative_source: str = field(
        default="bm25",
        metadata={"help": "retrieval negatives: 'bm25' (the query's unjudged BM25 top retrieval_negative_depth), "
                  "'dense' (the current model's own unjudged top retrieval_negative_depth, re-mined during "
                  "training) or 'mixed' (half each)."},
    )  # fmt: skip
    retrieval_negative_depth: int = field(
        default=100, metadata={"help": "retrieval negatives: mined from each query's top N of the source."}
    )
    retrieval_remine_steps: int = field(
        default=0,
        metadata={"help": "retrieval negatives from 'dense' / 'mixed': re-mine the train queries' negatives with "
                  "the model being trained every N optimizer steps (0: at the start of every epoch)."},
    )  # fmt: skip
    retrieval_teacher: str | None = field(
        default=None,
        metadata={"help": "retrieval: a finished rerank (cross-encoder) run to distil from: Margin-MSE on each "
                  "(query, positive, negative) triple scored by it (scores cached by teacher weights and pair)."},
    )  # fmt: skip
    retrieval_distill_weight: float = field(
        default=1.0, metadata={"help": "retrieval with retrieval_teacher: weight of the Margin-MSE loss."}
    )
    retrieval_contrastive_weight: float = field(
        default=1.0,
        metadata={"help": "retrieval: weight of the in-batch contrastive loss (0 with retrieval_teacher: "
                  "distillation alone)."},
    )  # fmt: skip
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
    catalogue_chunk_rows: int = field(
        default=65536,
        metadata={"help": "retrieval: catalogue rows encoded at a time, each chunk written to the cache file as it "
                  "finishes, so memory stays at one chunk and a killed job resumes at the next chunk; under N "
                  "processes the chunks are shared among them."},
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
        choices = {"rerank_first_stage": FIRST_STAGES, "retrieval_mode": RETRIEVAL_MODES,
                   "retrieval_fusion": FUSIONS, "retrieval_index": ("exact", "faiss"),
                   "retrieval_negative_source": NEGATIVE_SOURCES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rerank_first_stage in ("dense", "hybrid") and not self.rerank_retrieval_run:
            raise ValueError(f"rerank_first_stage {self.rerank_first_stage!r} needs rerank_retrieval_run (a finished "
                             "retrieval run)")  # fmt: skip
        if self.rerank_interpolation and self.rerank_first_stage == "judged":
            raise ValueError("rerank_interpolation fuses a first stage's scores with the cross-encoder's: "
                             "rerank_first_stage judged has none (use bm25, dense or hybrid)")  # fmt: skip
        for name in ("retrieval_top_k", "max_train_queries", "max_eval_queries", "retrieval_fusion_depth",
                     "retrieval_negative_depth", "catalogue_chunk_rows"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("retrieval_negatives", "retrieval_remine_steps", "retrieval_distill_weight",
                     "retrieval_contrastive_weight"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be positive, got {self.retrieval_temperature}")
        if not self.retrieval_teacher and self.retrieval_contrastive_weight == 0:
            raise ValueError("retrieval_contrastive_weight 0 leaves no loss without retrieval_teacher")
        if self.retrieval_teacher and self.retrieval_distill_weight == 0 and self.retrieval_contrastive_weight == 0:
            raise ValueError("retrieval_distill_weight and retrieval_contrastive_weight are both 0: no loss")
        if self.retrieval_teacher and not (self.retrieval_negatives or self.retrieval_hard_negatives):
            raise ValueError("retrieval_teacher distils on (query, positive, negative) triples: set "
                             "retrieval_negatives or retrieval_hard_negatives")  # fmt: skip

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


# What the ranking tasks' predict takes besides the queries (`querytune predict` flags, `POST /predict` fields).
CANDIDATES = TaskInput("candidates", "rerank, retrieval: the documents to rank for every query", item="candidate")
RERANK_INPUTS = (CANDIDATES,)
RETRIEVAL_INPUTS = (CANDIDATES, TaskInput("catalogue", "retrieval: a catalogue file to search (default: the run's "
                                          "dataset)", kind="path"))  # fmt: skip
