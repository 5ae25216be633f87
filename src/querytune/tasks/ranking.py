"""Query–product relevance: a cross-encoder reranker (`task: rerank`) and a bi-encoder retriever (`task: retrieval`).

- rerank: `AutoModelForSequenceClassification` with one output over the (query, document) pair. The objective is
  `rerank_objective`: `regression` (MSE on the graded label; RMSE is reported), `binary` (BCE on
  `label >= relevance_threshold`), `graded` (BCE on the gain scaled to [0, 1]) or `listwise` (softmax
  cross-entropy over each query's documents in a batch, target proportional to the gain; batches are cut from
  whole queries by `QueryGroupSampler`). Judged pairs are mostly relevant, so `rerank_negatives` adds unjudged
  catalogue documents per query (from its BM25 hits, the catalogue at random, or both) labelled irrelevant. Only
  the document is truncated (`truncation="only_second"`); a query longer than half of `max_seq_length` is the one
  case where the query is cut too (`longest_first`, logged).
- retrieval: one shared `AutoModel` encoder, mean pooling, cosine similarity; the loss is cross-entropy over
  in-batch negatives plus one judged non-relevant document of the same query per pair (hard negative). Other
  relevant documents of the same query in the batch are masked, not treated as negatives. A custom Trainer
  computes the loss over AutoModel outputs, so every PEFT method and the Trainer path apply unchanged
  (sentence-transformers' own trainer would bypass `querytune.methods` and the run layout).

Both are scored at the end of training on the test split (validation when there is none) against the whole
catalogue: retrieval searches every document; rerank reorders the BM25 top `retrieval_top_k` (or, with
`rerank_first_stage: judged`, only the judged documents). Metrics: `querytune/metrics/ranking`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import peft
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch.utils.data import Sampler
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
)

from querytune.bm25 import BM25Index
from querytune.data import DataError
from querytune.metrics import load_metric
from querytune.ranking_data import (
    COLUMNS,
    RankingData,
    first_query_texts,
    load_ranking_data,
    qrels,
    read_catalogue,
)
from querytune.tasks.base import Task, length_batches

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


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states under the attention mask (prompt tuning's virtual tokens are dropped)."""
    hidden = hidden[:, -mask.shape[1] :]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    return F.normalize(mean_pool(out.last_hidden_state, attention_mask), dim=-1)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    """Unit-length mean-pooled embeddings; batches are formed by length so little time goes to padding."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for idx in length_batches([len(t) for t in texts], batch_size):
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)  # fmt: skip
        out[idx] = embed_batch(model, enc["input_ids"], enc["attention_mask"]).float().cpu().numpy()
    return out


@torch.inference_mode()
def score_pairs(model, tokenizer, queries: list[str], documents: list[str], max_length: int,
                batch_size: int = 128) -> np.ndarray:  # fmt: skip
    """The cross-encoder's score for each (query, document) pair."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(queries), dtype=np.float32)
    for idx in length_batches([len(q) + len(d) for q, d in zip(queries, documents, strict=True)], batch_size):
        enc = encode_pairs(tokenizer, [queries[i] for i in idx], [documents[i] for i in idx], max_length)
        batch = tokenizer.pad(dict(enc), return_tensors="pt").to(device)
        out[idx] = model(**batch).logits.float().reshape(-1).cpu().numpy()
    return out


def model_fingerprint(model) -> str:
    """A digest of every weight: the cache key of catalogue embeddings for exactly this model and checkpoint."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def catalogue_embeddings(model, tokenizer, doc_ids: list[str], texts: list[str], max_length: int,
                         cache_dir: str | None, batch_size: int = 128) -> np.ndarray:  # fmt: skip
    """Embeddings of the catalogue, cached by model weights, max_length and catalogue content."""
    digest = hashlib.sha256(json.dumps([doc_ids, texts, max_length]).encode()).hexdigest()[:20]
    folder = Path(cache_dir or "~/.cache/querytune/catalogue").expanduser()
    path = folder / f"{model_fingerprint(model)}-{digest}.npy"
    if path.is_file():
        logger.info("catalogue embeddings from cache %s", path)
        return np.load(path)
    logger.info("encoding the catalogue: %d documents", len(texts))
    emb = embed_texts(model, tokenizer, texts, max_length, batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


def top_k(query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the k nearest documents per query, best first."""
    k = min(k, len(doc_emb))
    scores = query_emb @ doc_emb.T
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def ranking_metrics(runs: dict[str, list[tuple[str, float]]], judged: dict[str, dict[str, float]], data,
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
        gain_offset=data.relevance_gain_offset, relevance_threshold=data.relevance_threshold,
    )  # fmt: skip


def write_rankings(path: Path, runs: dict[str, list[tuple[str, float]]], queries: dict[str, str],
                   catalogue: dict[str, str], judged: dict[str, dict[str, float]], k: int = 10) -> None:  # fmt: skip
    """The top k of each query with scores and judgements, for reading what the model does."""
    with path.open("w") as fh:
        for q, ranked in runs.items():
            hits = [{"doc_id": d, "text": catalogue.get(d, d), "score": round(s, 5), "label": judged.get(q, {}).get(d)}
                    for d, s in ranked[:k]]  # fmt: skip
            fh.write(json.dumps({"query": queries.get(q, q), "hits": hits}, ensure_ascii=False) + "\n")


class _RankingTask(Task):
    """What rerank and retrieval share: query-grouped data, the catalogue and the evaluation split."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.data: RankingData | None = None

    def load_data(self) -> DatasetDict:
        self.data = load_ranking_data(self.config.data, self.config.training.seed)
        return self.data.splits

    def catalogue_role(self) -> str:
        return "test" if self.data is not None and "test" in self.data.splits else "validation"

    def _catalogue(self, catalogue: str | None = None) -> dict[str, str]:
        if catalogue:
            return read_catalogue(catalogue, self.config.data)
        if self.data is None:
            self.data = load_ranking_data(self.config.data, self.config.training.seed)
        return self.data.catalogue

    def split_metrics(self, trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
        """The Trainer's metrics on the tokenised split."""
        return trainer.predict(dataset, metric_key_prefix=prefix).metrics

    def evaluate_trained(self, trainer: Trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """The split's Trainer metrics, plus the catalogue search / rerank metrics on the catalogue role."""
        prefix = "eval" if role == "validation" else "test"
        metrics = self.split_metrics(trainer, dataset, prefix)
        if role == self.catalogue_role() and trainer.is_world_process_zero():
            found = self.catalogue_metrics(trainer.model, trainer.processing_class, self.data.splits[role], out_dir,
                                           role, trainer.args.per_device_eval_batch_size)  # fmt: skip
            metrics.update({f"{prefix}_{k}": v for k, v in found.items()})
        return metrics

    def _eval_split(self, split: str) -> Dataset:
        """A split for `querytune eval`, by role name or the dataset's own split name."""
        self.data = load_ranking_data(self.config.data, self.config.training.seed)
        roles = {v: k for k, v in {"train": self.config.data.train_split,
                                   "validation": self.config.data.validation_split,
                                   "test": self.config.data.test_split}.items() if v}  # fmt: skip
        role = roles.get(split, split)
        if role not in self.data.splits:
            raise DataError(f"{self.data.source}: no split {split!r}; it has {list(self.data.splits)}")
        return self.data.splits[role]


# --- cross-encoder
def sample_negatives(split: Dataset, catalogue: dict[str, str], n: int, label: float, seed: int,
                     hits: dict[str, list[str]] | None = None, hard_share: float = 0.0) -> Dataset:  # fmt: skip
    """`split` plus `n` unjudged catalogue documents per query, labelled `label`.

    `round(n * hard_share)` of them are drawn at random from the query's `hits` (its first-stage results, e.g. the
    BM25 top k) that are not judged for it; the rest, and any shortfall, at random from the whole catalogue. Queries
    are visited in sorted order, so the sample depends only on the seed and the data.
    """
    frame = split.to_pandas()
    judged, texts = qrels(frame), first_query_texts(frame)
    doc_ids = list(catalogue)
    rng = np.random.default_rng(seed)
    rows = []
    for q in sorted(judged):
        seen = set(judged[q])
        pool = [d for d in (hits or {}).get(q, []) if d not in seen]
        take = min(len(pool), round(n * hard_share))
        picked = [pool[i] for i in rng.choice(len(pool), size=take, replace=False)] if take else []
        seen.update(picked)
        for _ in range(20 * n):  # rejection sampling; a tiny catalogue may not have n unjudged documents
            if len(picked) >= n or len(seen) >= len(doc_ids):
                break
            d = doc_ids[int(rng.integers(len(doc_ids)))]
            if d not in seen:
                picked.append(d)
                seen.add(d)
        rows += [(q, texts[q], d, catalogue[d], float(label)) for d in picked]
    extra = pd.DataFrame(rows, columns=COLUMNS).astype({"label": "float64"})
    return Dataset.from_pandas(pd.concat([frame[COLUMNS], extra], ignore_index=True), preserve_index=False)


class QueryGroupSampler(Sampler[int]):
    """Row indices query by query (queries in a seeded random order, rows shuffled within each), so a batch holds
    whole queries, except where a query straddles two batches: what the listwise loss needs. Reshuffled each epoch."""

    def __init__(self, query_ids: list[int], seed: int) -> None:
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(query_ids):
            groups.setdefault(int(q), []).append(i)
        self.groups, self.seed, self.epoch = list(groups.values()), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1  # a new order next time, also when nobody calls set_epoch
        for g in rng.permutation(len(self.groups)):
            group = self.groups[g]
            yield from (group[i] for i in rng.permutation(len(group)))


def listwise_loss(scores: torch.Tensor, gains: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per query, target proportional to the gain (Bruch et al., 2019), averaged over the
    queries of the batch that have two or more documents and some gain (zero, still differentiable, if none)."""
    losses = []
    for q in query_ids.unique():
        mask = query_ids == q
        gain = gains[mask].clamp(min=0)
        if mask.sum() > 1 and gain.sum() > 0:
            losses.append(-(gain / gain.sum() * F.log_softmax(scores[mask], dim=0)).sum())
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


class RerankTrainer(Trainer):
    """One output per pair; the query ids ride along as a label, so metrics and the listwise loss group by query."""

    def __init__(self, *args, objective: str = "regression", threshold: float = 2.5, gain_offset: float = 1.0,
                 gain_max: float = 3.0, **kwargs) -> None:  # fmt: skip
        kwargs["args"].remove_unused_columns = False  # query_ids is not a model input
        super().__init__(*args, **kwargs)
        self.objective, self.threshold = objective, threshold
        self.gain_offset, self.gain_scale = gain_offset, max(gain_max - gain_offset, 1e-9)
        self.label_names = ["labels", "query_ids"]

    def _get_train_sampler(self, train_dataset=None):
        if self.objective != "listwise":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return QueryGroupSampler(dataset["query_ids"], self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels").float()
        query_ids = inputs.pop("query_ids", None)
        outputs = model(**inputs)
        logits = outputs.logits.float().reshape(-1)
        if self.objective == "regression":
            loss = F.mse_loss(logits, labels)
        elif self.objective == "binary":
            loss = F.binary_cross_entropy_with_logits(logits, (labels >= self.threshold).float())
        elif self.objective == "graded":
            target = ((labels - self.gain_offset) / self.gain_scale).clamp(0, 1)
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:
            loss = listwise_loss(logits, labels - self.gain_offset, query_ids)
        return (loss, outputs) if return_outputs else loss


class RerankTask(_RankingTask):
    """Cross-encoder over (query, document) pairs, scored per query."""

    model_class = AutoModelForSequenceClassification
    peft_task_type = peft.TaskType.SEQ_CLS
    default_metric = "judged_ndcg@10"
    trainer_class = RerankTrainer

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        data = self.config.data
        return {"objective": data.rerank_objective, "threshold": data.relevance_threshold,
                "gain_offset": data.relevance_gain_offset, "gain_max": max(self.data.splits["train"]["label"])}  # fmt: skip

    def with_negatives(self, splits: DatasetDict) -> DatasetDict:
        """Train and validation plus `rerank_negatives` sampled unjudged documents per query (test is left as is)."""
        data = self.config.data
        if not data.rerank_negatives:
            return splits
        catalogue = self._catalogue()
        label = data.rerank_negative_label
        label = float(min(splits["train"]["label"])) if label is None else label
        share = {"bm25": 1.0, "random": 0.0, "mixed": 0.5}[data.rerank_negative_source]
        out = dict(splits)
        for offset, role in enumerate(("train", "validation")):
            if role not in splits:
                continue
            hits = None
            if share:
                texts = first_query_texts(splits[role])
                ids = sorted(texts)
                found = self._bm25(catalogue).search([texts[q] for q in ids], data.retrieval_top_k)
                hits = {q: [d for d, _ in h] for q, h in zip(ids, found, strict=True)}
            out[role] = sample_negatives(splits[role], catalogue, data.rerank_negatives, label,
                                         self.config.training.seed + offset, hits, share)  # fmt: skip
            logger.info("%s: %d judged pairs + %d sampled negatives (%s, label %g)", role, len(splits[role]),
                        len(out[role]) - len(splits[role]), data.rerank_negative_source, label)  # fmt: skip
        return DatasetDict(out)

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        max_len = min(self.config.model.max_seq_length, tokenizer.model_max_length or 10**6)
        splits = self.with_negatives(splits)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = dict(encode_pairs(tokenizer, batch["query"], batch["document"], max_len))
            out["labels"] = [float(y) for y in batch["label"]]
            return out

        encoded = {}
        for name, ds in splits.items():
            ids = {q: i for i, q in enumerate(dict.fromkeys(ds["query_id"]))}
            ds = ds.add_column("query_ids", [ids[q] for q in ds["query_id"]])
            encoded[name] = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != "query_ids"],
                                   desc=f"tokenising {name}")  # fmt: skip
        return DatasetDict(encoded)

    def collator(self, tokenizer):
        mixed = self.config.training.fp16 or self.config.training.bf16
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed else None)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """Candidate metrics over each query's rows of the split (its judged documents, plus its sampled negatives
        where `rerank_negatives` is set) and RMSE for regression."""
        scores = np.asarray(prediction.predictions).reshape(-1)
        labels, query_ids = prediction.label_ids
        regression = self.config.data.rerank_objective == "regression"
        metrics = load_metric("ranking").compute(
            predictions=scores.tolist(), references=np.asarray(labels, dtype=float).tolist(),
            query_ids=[str(int(q)) for q in query_ids], doc_ids=[str(i) for i in range(len(scores))], rmse=regression,
            gain_offset=self.config.data.relevance_gain_offset, relevance_threshold=self.config.data.relevance_threshold,
        )  # fmt: skip
        keep = ("ndcg@5", "ndcg@10", "mrr@10", "map")
        out = {f"judged_{k}": v for k, v in metrics.items() if k in keep}
        if regression:
            out["rmse"] = metrics["rmse"]
        return out

    def rerank_split(self, model, tokenizer, split: Dataset, batch_size: int = 128) -> tuple[dict, dict]:
        """First stage (BM25 over the catalogue, or the judged documents) then the cross-encoder; ranked lists."""
        data = self.config.data
        judged = qrels(split)
        queries = first_query_texts(split)
        catalogue = self._catalogue()
        if data.rerank_first_stage == "judged":
            candidates = {q: list(docs) for q, docs in judged.items()}
        else:
            index = self._bm25(catalogue)
            ids = list(judged)
            hits = index.search([queries[q] for q in ids], data.retrieval_top_k)
            candidates = {q: [d for d, _ in h] for q, h in zip(ids, hits, strict=True)}
        pairs = [(q, d) for q, docs in candidates.items() for d in docs]
        scores = score_pairs(model, tokenizer, [queries[q] for q, _ in pairs], [catalogue.get(d, d) for _, d in pairs],
                             self.config.model.max_seq_length, batch_size)  # fmt: skip
        runs: dict[str, list[tuple[str, float]]] = {q: [] for q in judged}
        for (q, d), s in zip(pairs, scores, strict=True):
            runs[q].append((d, float(s)))
        for q in runs:
            runs[q].sort(key=lambda x: -x[1])
        return runs, judged

    def _bm25(self, catalogue: dict[str, str]) -> BM25Index:
        """The BM25 index of `catalogue`, built once per catalogue object (the object is kept, so an id is never
        reused for another catalogue)."""
        if getattr(self, "_bm25_catalogue", None) is not catalogue:
            self._bm25_index, self._bm25_catalogue = BM25Index(list(catalogue), list(catalogue.values())), catalogue
        return self._bm25_index

    def catalogue_metrics(self, model, tokenizer, split: Dataset, out_dir: Path, role: str,
                          batch_size: int = 128) -> dict[str, float]:  # fmt: skip
        runs, judged = self.rerank_split(model, tokenizer, split, batch_size)
        write_rankings(out_dir / f"{role}_rankings.jsonl", runs, first_query_texts(split), self._catalogue(), judged)
        k = self.config.data.retrieval_top_k
        return ranking_metrics(runs, judged, self.config.data, recall_k=tuple(sorted({10, k})))

    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64, candidates: list[str] | None = None,
                catalogue: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Each query's candidates ranked by the cross-encoder (all of them unless top_k is smaller)."""
        if not candidates:
            raise ValueError("rerank: no candidates; pass --candidates, --candidates_file or candidates on stdin")
        results = []
        for query in texts:
            scores = score_pairs(run.model, run.tokenizer, [query] * len(candidates), candidates,
                                 self.config.model.max_seq_length, batch_size)  # fmt: skip
            order = np.argsort(-scores, kind="stable")[: top_k if top_k > 0 else None]
            ranked = [{"rank": r + 1, "text": candidates[i], "score": round(float(scores[i]), 6)}
                      for r, i in enumerate(order)]  # fmt: skip
            results.append({"query": query, "ranked": ranked})
        return results

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        ds = self._eval_split(split)
        judged = qrels(ds)
        scores = score_pairs(run.model, run.tokenizer, ds["query"], ds["document"], self.config.model.max_seq_length,
                             batch_size)  # fmt: skip
        ids = {q: i for i, q in enumerate(judged)}
        pointwise = self.compute_metrics(EvalPrediction(predictions=scores, label_ids=(
            np.asarray(ds["label"]), np.asarray([ids[q] for q in ds["query_id"]]))))  # fmt: skip
        found = self.catalogue_metrics(run.model, run.tokenizer, ds, out_dir, split, batch_size)
        return {"num_queries": len(judged), "num_pairs": len(ds), **pointwise, **found}


# --- bi-encoder
class RetrievalCollator:
    """Pads the query, positive and (where present) hard-negative encodings separately."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _pad(self, rows: list[dict], prefix: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.pad(
            [{"input_ids": r[f"{prefix}input_ids"], "attention_mask": r[f"{prefix}attention_mask"]} for r in rows],
            return_tensors="pt",
        )
        return {f"{prefix}input_ids": enc["input_ids"], f"{prefix}attention_mask": enc["attention_mask"]}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {**self._pad(features, "query_"), **self._pad(features, "doc_")}
        negatives = [f for f in features if f["neg_input_ids"]]
        if negatives:
            batch.update(self._pad(negatives, "neg_"))
        batch["query_ids"] = torch.tensor([f["query_ids"] for f in features])
        return batch


class RetrievalTrainer(Trainer):
    """In-batch contrastive loss over mean-pooled AutoModel outputs, with hard negatives."""

    def __init__(self, *args, temperature: float = 0.05, **kwargs) -> None:
        training = kwargs["args"]
        training.remove_unused_columns = False  # the encodings are not named like model inputs
        if training.metric_for_best_model in ("loss", "eval_loss"):
            training.greater_is_better = False
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.label_names = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q = embed_batch(model, inputs["query_input_ids"], inputs["query_attention_mask"])
        docs = embed_batch(model, inputs["doc_input_ids"], inputs["doc_attention_mask"])
        if "neg_input_ids" in inputs:
            docs = torch.cat([docs, embed_batch(model, inputs["neg_input_ids"], inputs["neg_attention_mask"])])
        scores = q @ docs.T / self.temperature
        # Another relevant document of the same query in the batch is not a negative.
        qids = inputs["query_ids"]
        n = len(qids)
        same = qids[:, None] == qids[None, :]
        same &= ~torch.eye(n, dtype=torch.bool, device=same.device)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[:, :n] = same
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        loss = F.cross_entropy(scores, torch.arange(n, device=scores.device))
        return (loss, {"scores": scores}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class RetrievalTask(_RankingTask):
    """Bi-encoder: one encoder for queries and documents, retrieval over the whole catalogue."""

    model_class = AutoModel
    peft_task_type = peft.TaskType.FEATURE_EXTRACTION
    default_metric = "loss"
    trainer_class = RetrievalTrainer

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        return {"temperature": self.config.data.retrieval_temperature}

    def training_pairs(self, split: Dataset, seed: int) -> Dataset:
        """One row per relevant (query, document) pair, with one judged non-relevant document of the query."""
        data = self.config.data
        rng = np.random.default_rng(seed)
        frame = split.to_pandas()
        rows: dict[str, list] = {"query": [], "positive": [], "negative": [], "query_ids": []}
        for qi, (_, group) in enumerate(frame.groupby("query_id", sort=True)):
            relevant = group[group["label"] >= data.relevance_threshold]
            others = group[group["label"] < data.relevance_threshold]["document"].tolist()
            for doc in relevant["document"]:
                rows["query"].append(group["query"].iloc[0])
                rows["positive"].append(doc)
                use = data.retrieval_hard_negatives and others
                rows["negative"].append(others[int(rng.integers(len(others)))] if use else "")
                rows["query_ids"].append(qi)
        if not rows["query"]:
            raise DataError(f"no relevant pairs (label >= relevance_threshold {data.relevance_threshold}) to train on")
        return Dataset.from_dict(rows).shuffle(seed=seed)

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        max_len = min(self.config.model.max_seq_length, tokenizer.model_max_length or 10**6)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"query_ids": batch["query_ids"]}
            for prefix, column in (("query_", "query"), ("doc_", "positive"), ("neg_", "negative")):
                enc = tokenizer(batch[column], truncation=True, max_length=max_len)
                empty = [not t for t in batch[column]]
                out[f"{prefix}input_ids"] = [[] if e else x for x, e in zip(enc["input_ids"], empty, strict=True)]
                out[f"{prefix}attention_mask"] = [[] if e else x for x, e in
                                                  zip(enc["attention_mask"], empty, strict=True)]  # fmt: skip
            return out

        seed = self.config.training.seed
        return DatasetDict({name: self.training_pairs(ds, seed).map(
            encode, batched=True, remove_columns=["query", "positive", "negative"], desc=f"tokenising {name}")
            for name, ds in splits.items()})  # fmt: skip

    def collator(self, tokenizer):
        return RetrievalCollator(tokenizer)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        return {}  # only the in-batch loss during training; retrieval metrics come from `evaluate_trained`

    def retrieve(self, model, tokenizer, queries: list[str], catalogue: dict[str, str], k: int,
                 batch_size: int = 128) -> list[list[tuple[str, float]]]:  # fmt: skip
        max_len = self.config.model.max_seq_length
        doc_ids, texts = list(catalogue), list(catalogue.values())
        doc_emb = catalogue_embeddings(model, tokenizer, doc_ids, texts, max_len, self.config.data.catalogue_cache_dir,
                                       batch_size)  # fmt: skip
        idx, scores = top_k(embed_texts(model, tokenizer, queries, max_len, batch_size), doc_emb, k)
        return [
            [(doc_ids[i], float(s)) for i, s in zip(r, sc, strict=True)] for r, sc in zip(idx, scores, strict=True)
        ]

    def catalogue_metrics(self, model, tokenizer, split: Dataset, out_dir: Path, role: str,
                          batch_size: int = 128) -> dict[str, float]:  # fmt: skip
        judged = qrels(split)
        queries = first_query_texts(split)
        catalogue = self._catalogue()
        ids = list(judged)
        k = self.config.data.retrieval_top_k
        hits = self.retrieve(model, tokenizer, [queries[q] for q in ids], catalogue, k, batch_size)
        runs = dict(zip(ids, hits, strict=True))
        write_rankings(out_dir / f"{role}_rankings.jsonl", runs, queries, catalogue, judged)
        return ranking_metrics(runs, judged, self.config.data, recall_k=tuple(sorted({10, k})))

    def split_metrics(self, trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
        return trainer.evaluate(dataset, metric_key_prefix=prefix)  # only the loss: there are no per-pair outputs

    def predict(self, run, texts: list[str], top_k: int = 10, batch_size: int = 64, candidates: list[str] | None = None,
                catalogue: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """The top_k catalogue documents per query (candidates, when given, are the catalogue)."""
        docs = {c: c for c in candidates} if candidates else self._catalogue(catalogue)
        hits = self.retrieve(run.model, run.tokenizer, texts, docs, max(1, top_k), batch_size)
        return [{"query": q, "ranked": [{"rank": r + 1, "doc_id": d, "text": docs[d], "score": round(s, 6)}
                                        for r, (d, s) in enumerate(h)]} for q, h in zip(texts, hits, strict=True)]  # fmt: skip

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        ds = self._eval_split(split)
        found = self.catalogue_metrics(run.model, run.tokenizer, ds, out_dir, split, batch_size)
        return {"num_queries": len(set(ds["query_id"])), "num_pairs": len(ds), **found}
