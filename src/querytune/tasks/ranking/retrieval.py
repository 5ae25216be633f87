"""`task: retrieval`: a bi-encoder (one shared encoder, mean pooling, cosine) that searches the whole catalogue.

The loss is cross-entropy over in-batch negatives plus one judged non-relevant document of the same query per pair
(hard negative); other relevant documents of the same query in the batch are masked, not treated as negatives. A
custom Trainer computes the loss over AutoModel outputs, so every PEFT method and the Trainer path apply unchanged
(sentence-transformers' own trainer would bypass `querytune.methods` and the run layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoModel, EvalPrediction, Trainer

from querytune.data import DataError
from querytune.progress import progress
from querytune.tasks.base import length_batches
from querytune.tasks.ranking.common import RankingTask, ranking_metrics, write_rankings
from querytune.tasks.ranking.data import first_query_texts, qrels

logger = logging.getLogger(__name__)


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
    for idx in progress(list(length_batches([len(t) for t in texts], batch_size)), "embedding texts"):
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)  # fmt: skip
        out[idx] = embed_batch(model, enc["input_ids"], enc["attention_mask"]).float().cpu().numpy()
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


class RetrievalTask(RankingTask):
    """Bi-encoder: one encoder for queries and documents, retrieval over the whole catalogue."""

    model_class = AutoModel
    peft_task_type = peft.TaskType.FEATURE_EXTRACTION
    default_metric = "loss"
    trainer_class = RetrievalTrainer
    pipeline_tag = "sentence-similarity"
    card_tags = ("bi-encoder", "retrieval", "feature-extraction")
    request_inputs = ("candidates", "catalogue")
    default_top_k = 10

    def export_unsupported(self) -> str | None:
        return ("a retrieval run is served from its run directory (`querytune serve RUN`); exporting the query "
                "encoder is not supported yet")  # fmt: skip

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        return {"temperature": self.args.retrieval_temperature}

    def training_pairs(self, split: Dataset, seed: int) -> Dataset:
        """One row per relevant (query, document) pair, with one judged non-relevant document of the query."""
        args = self.args
        rng = np.random.default_rng(seed)
        frame = split.to_pandas()
        rows: dict[str, list] = {"query": [], "positive": [], "negative": [], "query_ids": []}
        for qi, (_, group) in enumerate(frame.groupby("query_id", sort=True)):
            relevant = group[group["label"] >= args.relevance_threshold]
            others = group[group["label"] < args.relevance_threshold]["document"].tolist()
            for doc in relevant["document"]:
                rows["query"].append(group["query"].iloc[0])
                rows["positive"].append(doc)
                use = args.retrieval_hard_negatives and others
                rows["negative"].append(others[int(rng.integers(len(others)))] if use else "")
                rows["query_ids"].append(qi)
        if not rows["query"]:
            raise DataError(f"no relevant pairs (label >= relevance_threshold {args.relevance_threshold}) to train on")
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
        doc_emb = catalogue_embeddings(model, tokenizer, doc_ids, texts, max_len, self.args.catalogue_cache_dir,
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
        k = self.args.retrieval_top_k
        hits = self.retrieve(model, tokenizer, [queries[q] for q in ids], catalogue, k, batch_size)
        runs = dict(zip(ids, hits, strict=True))
        write_rankings(out_dir / f"{role}_rankings.jsonl", runs, queries, catalogue, judged)
        return ranking_metrics(runs, judged, self.args, recall_k=tuple(sorted({10, k})))

    def split_metrics(self, trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
        return trainer.evaluate(dataset, metric_key_prefix=prefix)  # only the loss: there are no per-pair outputs

    def predict(self, run, texts: list[str], top_k: int = 10, batch_size: int = 64, candidates: list[str] | None = None,
                catalogue: str | None = None, **inputs) -> list[dict[str, Any]]:  # fmt: skip
        """The top_k catalogue documents per query (candidates, when given, are the catalogue)."""
        docs = {c: c for c in candidates} if candidates else self._catalogue(catalogue)
        hits = self.retrieve(run.model, run.tokenizer, texts, docs, max(1, top_k), batch_size)
        return [{"query": q, "ranked": [{"rank": r + 1, "doc_id": d, "text": docs[d], "score": round(s, 6)}
                                        for r, (d, s) in enumerate(h)]} for q, h in zip(texts, hits, strict=True)]  # fmt: skip

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        ds = self._eval_split(split)
        found = self.catalogue_metrics(run.model, run.tokenizer, ds, out_dir, split, batch_size)
        return {"num_queries": len(set(ds["query_id"])), "num_pairs": len(ds), **found}
