"""What the relevance tasks share: pair encoding and scoring, ranking metrics, and the query-grouped task base.

- `task: rerank` (`querytune.tasks.ranking.rerank`): a cross-encoder over (query, document) pairs that reorders a
  first stage's candidates.
- `task: retrieval` (`querytune.tasks.ranking.retrieval`): a bi-encoder that searches the whole catalogue.

Both are scored at the end of training on the test split (validation when there is none) against the whole
catalogue, with the bundled ranking metric module (`querytune/metrics/ranking`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import Trainer

from querytune.data import DataError
from querytune.extras import require
from querytune.metrics import load_metric
from querytune.progress import progress
from querytune.tasks.base import Task, length_batches
from querytune.tasks.ranking.args import RankingArguments
from querytune.tasks.ranking.bm25 import BM25Index
from querytune.tasks.ranking.data import RankingData, load_ranking_data, read_catalogue
from querytune.tasks.ranking.fusion import _ranx

logger = logging.getLogger(__name__)


# --- encoding
def encode_pairs(tokenizer, queries: list[str], documents: list[str], max_length: int, **kwargs: Any):
    """Tokenise (query, document) pairs cutting only the document; over-long queries are cut too, and logged.

    A query whose tokens exceed half of `max_length` (after special tokens) would leave little or no room for
    the document, and `only_second` cannot fit it: such pairs use `longest_first`, which cuts the longer of the two
    so the query keeps about half of the length.
    """
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    budget = (max_length - specials) // 2
    lengths = [len(ids) for ids in tokenizer(queries, add_special_tokens=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > budget]
    if not long:
        return tokenizer(queries, documents, truncation="only_second", max_length=max_length, **kwargs)
    logger.warning("%d of %d queries are longer than %d tokens (half of max_seq_length %d): query and document "
                   "are both cut for those pairs", len(long), len(queries), budget, max_length)  # fmt: skip
    short = [i for i in range(len(queries)) if i not in set(long)]
    parts = {}
    for idx, mode in ((short, "only_second"), (long, "longest_first")):
        if idx:
            parts[mode] = (idx, tokenizer([queries[i] for i in idx], [documents[i] for i in idx], truncation=mode,
                                          max_length=max_length, **kwargs))  # fmt: skip
    if kwargs.get("return_tensors"):
        raise ValueError("encode_pairs: pad and convert after merging; do not pass return_tensors with long queries")
    merged: dict[str, list] = {key: [None] * len(queries) for key in next(iter(parts.values()))[1].keys()}
    for idx, enc in parts.values():
        for key, values in enc.items():
            for i, v in zip(idx, values, strict=True):
                merged[key][i] = v
    return merged


@torch.inference_mode()
def score_pairs(model, tokenizer, queries: list[str], documents: list[str], max_length: int,
                batch_size: int = 128) -> np.ndarray:  # fmt: skip
    """The cross-encoder's score for each (query, document) pair."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(queries), dtype=np.float32)
    batches = list(length_batches([len(q) + len(d) for q, d in zip(queries, documents, strict=True)], batch_size))
    for idx in progress(batches, "scoring pairs"):
        enc = encode_pairs(tokenizer, [queries[i] for i in idx], [documents[i] for i in idx], max_length)
        batch = tokenizer.pad(dict(enc), return_tensors="pt").to(device)
        out[idx] = model(**batch).logits.float().reshape(-1).cpu().numpy()
    return out


def model_fingerprint(model) -> str:
    """A digest of every weight: the cache key of catalogue embeddings and teacher scores for exactly this model."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def ranking_metrics(runs: dict[str, list[tuple[str, float]]], judged: dict[str, dict[str, float]],
                    args: RankingArguments,
                    recall_k: tuple[int, ...] = (), rmse: bool = False) -> dict[str, float]:  # fmt: skip
    """Score ranked lists against the judgements with the bundled ranking metric (unretrieved judged: NaN score)."""
    preds, refs, qs, ds = [], [], [], []
    for q, labels in judged.items():
        ranked = dict(runs.get(q, []))
        for d, score in ranked.items():
            preds.append(score)
            refs.append(labels.get(d, float("nan")))
            qs.append(q)
            ds.append(d)
        for d, y in labels.items():
            if d not in ranked:
                preds.append(float("nan"))
                refs.append(y)
                qs.append(q)
                ds.append(d)
    return load_metric("ranking").compute(
        predictions=preds, references=refs, query_ids=qs, doc_ids=ds, recall_k=list(recall_k), rmse=rmse,
        gain_offset=args.relevance_gain_offset, relevance_threshold=args.relevance_threshold,
    )  # fmt: skip


def write_rankings(path: Path, runs: dict[str, list[tuple[str, float]]], queries: dict[str, str],
                   catalogue: dict[str, str], judged: dict[str, dict[str, float]], k: int = 10) -> None:  # fmt: skip
    """The top k of each query with scores and judgements, for reading what the model does."""
    with path.open("w") as fh:
        for q, ranked in runs.items():
            hits = [{"doc_id": d, "text": catalogue.get(d, d), "score": round(s, 5), "label": judged.get(q, {}).get(d)}
                    for d, s in ranked[:k]]  # fmt: skip
            fh.write(json.dumps({"query": queries.get(q, q), "hits": hits}, ensure_ascii=False) + "\n")


CATALOGUE_FILE = (
    "catalogue.jsonl"  # a run (and an export) carries the catalogue it searches: one {"id", "text"} a line
)


def write_catalogue(path: Path, catalogue: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for d, t in catalogue.items():
            fh.write(json.dumps({"id": d, "text": t}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_carried_catalogue(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {r["id"]: r["text"] for r in rows}


class RankingTask(Task):
    """What rerank and retrieval share: query-grouped data, the catalogue and the evaluation split."""

    arguments = RankingArguments
    card_metrics = {
        "ndcg@10": ("ndcg_at_10", "nDCG@10", 1.0),
        "mrr@10": ("mrr_at_10", "MRR@10", 1.0),
        "recall@100": ("recall_at_100", "Recall@100", 1.0),
    }
    report_columns = [("ndcg@10", "nDCG@10 %", 100.0), ("mrr@10", "MRR@10 %", 100.0),
                      ("recall@100", "R@100 %", 100.0)]  # fmt: skip
    # Whether every process takes part in the catalogue metrics (sharding the work) or only the first one.
    shares_catalogue_work = False

    def __init__(self, config) -> None:
        super().__init__(config)
        a = self.args  # the 'search' extra: checked here, before training, not when the validation stage needs it
        if a is not None and ("hybrid" in (a.retrieval_mode, a.rerank_first_stage) or a.rerank_interpolation):
            _ranx()  # sets NUMBA_CACHE_DIR before numba is imported
        if a is not None and a.retrieval_index == "faiss":
            require("faiss", extra="search", feature="retrieval_index faiss")
        self.data: RankingData | None = None
        self.carried: Path | None = None  # the catalogue a loaded run carries (`catalogue.jsonl`)

    def run_files(self, out_dir: Path) -> list[str]:
        """The catalogue the run searched at training time, so that it searches it from any directory or machine."""
        if self.data is None:
            return []
        write_catalogue(out_dir / CATALOGUE_FILE, self.data.catalogue)
        return [CATALOGUE_FILE]

    @classmethod
    def card_notes(cls, run_dir: Path) -> str:
        path = Path(run_dir) / CATALOGUE_FILE
        if not path.is_file():
            return ""
        count = sum(1 for line in path.read_text().splitlines() if line.strip())
        return (
            f'\n## Catalogue\n\nThe run searches the {count:,} products of `{CATALOGUE_FILE}` (one `{{"id", '
            f'"text"}}` a line), which travels with it: `querytune predict RUN_DIR "query"` and `querytune '
            f"serve RUN_DIR` search it on any machine."
            + (" `--catalogue FILE` searches another." if "catalogue" in {i.name for i in cls.request_inputs} else "")
            + "\n"
        )

    def loaded_from(self, run_dir: Path) -> None:
        if (Path(run_dir) / CATALOGUE_FILE).is_file():
            self.carried = Path(run_dir) / CATALOGUE_FILE

    @property
    def args(self) -> RankingArguments:
        """Always the current config's options (`querytune eval` swaps in a config re-parsed with overrides)."""
        return self.config.task_args

    @args.setter
    def args(self, value: RankingArguments) -> None:
        pass  # Task.__init__ assigns config.task_args: the property above already reads it

    def _bm25(self, catalogue: dict[str, str]) -> BM25Index:
        """The BM25 index of `catalogue`, built once per catalogue object (the object is kept, so an id is never
        reused for another catalogue)."""
        if getattr(self, "_bm25_catalogue", None) is not catalogue:
            self._bm25_index, self._bm25_catalogue = BM25Index(list(catalogue), list(catalogue.values())), catalogue
        return self._bm25_index

    def load_data(self) -> DatasetDict:
        self.data = load_ranking_data(self.config.data, self.args, self.config.training.seed)
        return self.data.splits

    def catalogue_role(self) -> str:
        return "test" if self.data is not None and "test" in self.data.splits else "validation"

    def _catalogue(self, catalogue: str | None = None) -> dict[str, str]:
        if catalogue:
            return read_catalogue(catalogue, self.config.data, self.args)
        if self.data is None and self.carried is not None:  # a loaded run: the catalogue it carries
            if getattr(self, "_carried_catalogue", None) is None:
                self._carried_catalogue = read_carried_catalogue(self.carried)
            return self._carried_catalogue
        if self.data is None:
            self.data = load_ranking_data(self.config.data, self.args, self.config.training.seed)
        return self.data.catalogue

    def split_metrics(self, trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
        """The Trainer's metrics on the tokenised split."""
        return trainer.predict(dataset, metric_key_prefix=prefix).metrics

    def evaluate_trained(self, trainer: Trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """The split's Trainer metrics, plus the catalogue search / rerank metrics on the catalogue role."""
        prefix = "eval" if role == "validation" else "test"
        metrics = self.split_metrics(trainer, dataset, prefix)
        if role == self.catalogue_role() and (self.shares_catalogue_work or trainer.is_world_process_zero()):
            found = self.catalogue_metrics(trainer.model, trainer.processing_class, self.data.splits[role], out_dir,
                                           role, trainer.args.per_device_eval_batch_size)  # fmt: skip
            metrics.update({f"{prefix}_{k}": v for k, v in found.items()})
        return metrics

    def _eval_split(self, split: str) -> Dataset:
        """A split for `querytune eval`, by role name or the dataset's own split name."""
        self.data = load_ranking_data(self.config.data, self.args, self.config.training.seed)
        roles = {v: k for k, v in {"train": self.config.data.train_split,
                                   "validation": self.config.data.validation_split,
                                   "test": self.config.data.test_split}.items() if v}  # fmt: skip
        role = roles.get(split, split)
        if role not in self.data.splits:
            raise DataError(f"{self.data.source}: no split {split!r}; it has {list(self.data.splits)}")
        return self.data.splits[role]
