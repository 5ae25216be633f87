"""`task: retrieval`: a bi-encoder (one shared encoder, mean pooling, cosine) that searches the whole catalogue.

Training. Each row is a relevant (query, document) pair. The loss is cross-entropy over in-batch negatives plus
the pairs' own negatives (`querytune.tasks.ranking.negatives`: one judged non-relevant document of the query, and
`retrieval_negatives` unjudged documents mined from the catalogue by BM25 or by the model itself, re-mined while it
trains). A document judged relevant for a row's query is never that row's negative (masked). With
`retrieval_teacher` (a finished rerank run) the Margin-MSE loss (Hofstätter et al., 2020) is added, or used alone:
for each (query, positive, negative) triple, the student's margin `(cos(q, p) - cos(q, n)) / temperature` is
regressed onto the teacher's `score(q, p) - score(q, n)`. A custom Trainer computes the loss over AutoModel outputs,
so every PEFT method and the Trainer path apply unchanged.

Search (`retrieval_mode`): `dense` (cosine over the catalogue embeddings, exact or through a faiss index:
`retrieval_index`), `bm25`, or `hybrid` (both fused with ranx; the fusion and its weight are chosen on the
validation queries at the end of training and saved as `retrieval_fusion.json`, see `fusion.py`).

Export: the query encoder (merged / ONNX / int8) plus the catalogue (`catalogue.jsonl`), its embeddings computed by
the PyTorch run (`catalogue_embeddings.npy`), the fusion and, with `retrieval_index: faiss`, the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
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
from querytune.shards import encode_to_file, sharded_map, world
from querytune.tasks.base import length_batches
from querytune.tasks.ranking.args import RETRIEVAL_INPUTS
from querytune.tasks.ranking.common import (
    CATALOGUE_FILE,
    RankingTask,
    model_fingerprint,
    ranking_metrics,
    read_carried_catalogue,
    write_catalogue,
    write_rankings,
)
from querytune.tasks.ranking.data import first_query_texts, qrels
from querytune.tasks.ranking.fusion import FUSION_FILE, choose_fusion, fuse, load_fusion, save_fusion
from querytune.tasks.ranking.index import ExactIndex, FaissIndex, build_index, index_cache_path
from querytune.tasks.ranking.index import top_k as top_k  # noqa: PLC0414  (re-exported: used by benchmarks)
from querytune.tasks.ranking.negatives import MiningCallback, NegativeMiner, QueryJudgements

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "catalogue_embeddings.npy"
INDEX_FILE = "catalogue.faiss"
Ranked = list[tuple[str, float]]


# --- encoding
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
    out: np.ndarray | None = None
    for idx in progress(list(length_batches([len(t) for t in texts], batch_size)), "embedding texts"):
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)  # fmt: skip
        extra = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}  # an ONNX graph needs it
        emb = embed_batch(model, enc["input_ids"], enc["attention_mask"], **extra).float().cpu().numpy()
        if out is None:  # the width comes from the output (an ONNX graph has no config)
            out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def catalogue_key(model, doc_ids: list[str], texts: list[str], max_length: int) -> str:
    """The cache key of a catalogue's embeddings: model weights, max_length and the catalogue's content."""
    digest = hashlib.sha256(json.dumps([doc_ids, texts, max_length]).encode()).hexdigest()[:20]
    return f"{model_fingerprint(model)}-{digest}"


def _cache_folder(cache_dir: str | None) -> Path:
    return Path(cache_dir or "~/.cache/querytune/catalogue").expanduser()


def catalogue_embeddings(model, tokenizer, doc_ids: list[str], texts: list[str], max_length: int,
                         cache_dir: str | None, batch_size: int = 128, key: str | None = None,
                         chunk_rows: int = 65536) -> np.ndarray:  # fmt: skip
    """Embeddings of the catalogue (memory-mapped), cached by model weights, max_length and catalogue content.

    Encoded `chunk_rows` at a time straight into the cache file (a killed job resumes at the next chunk); under N
    processes the chunks are shared among them and each ends with the whole matrix (`querytune.shards`).
    """
    path = _cache_folder(cache_dir) / f"{key or catalogue_key(model, doc_ids, texts, max_length)}.npy"
    if path.is_file():
        logger.info("catalogue embeddings from cache %s", path)
    return encode_to_file(lambda chunk: embed_texts(model, tokenizer, chunk, max_length, batch_size), texts, path,
                          chunk_rows)  # fmt: skip


# --- training
def margin_mse(student_pos: torch.Tensor, student_neg: torch.Tensor, teacher_pos: torch.Tensor,
               teacher_neg: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Margin-MSE: mean over triples of ((s_pos - s_neg) - (t_pos - t_neg))^2."""
    return F.mse_loss(student_pos - student_neg, (teacher_pos - teacher_neg).to(student_pos.dtype))


class RetrievalCollator:
    """Pads the queries and positives of a batch, adds each pair's current negatives (tokenised here, since they
    change when they are re-mined), the teacher's scores, and the mask of columns relevant to a row's query."""

    def __init__(self, tokenizer, miner: NegativeMiner | None = None, max_length: int = 512) -> None:
        self.tokenizer, self.miner, self.max_length = tokenizer, miner, max_length

    def _pad(self, rows: list[dict], prefix: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.pad(
            [{"input_ids": r[f"{prefix}input_ids"], "attention_mask": r[f"{prefix}attention_mask"]} for r in rows],
            return_tensors="pt",
        )
        return {f"{prefix}input_ids": enc["input_ids"], f"{prefix}attention_mask": enc["attention_mask"]}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {**self._pad(features, "query_"), **self._pad(features, "doc_")}
        batch["query_ids"] = torch.tensor([f["query_ids"] for f in features])
        miner = self.miner
        if miner is None:
            return batch
        pairs = [int(f["pair_ids"]) for f in features]
        owners, negatives = [], []
        for row, p in enumerate(pairs):
            for d in miner.negatives(p):
                owners.append(row)
                negatives.append(d)
        if negatives:
            enc = self.tokenizer([miner.catalogue.get(d, d) for d in negatives], truncation=True,
                                 max_length=self.max_length, padding=True, return_tensors="pt")  # fmt: skip
            batch["neg_input_ids"], batch["neg_attention_mask"] = enc["input_ids"], enc["attention_mask"]
            batch["neg_owner"] = torch.tensor(owners)
        # A column whose document is judged relevant for the row's query is not a negative of that row.
        columns = [miner.pair_positive[p] for p in pairs] + negatives
        relevant = [miner.relevant[miner.pair_query[p]] for p in pairs]
        batch["column_mask"] = torch.tensor([[c != row and d in relevant[row] for c, d in enumerate(columns)]
                                             for row in range(len(pairs))])  # fmt: skip
        if miner.teacher is not None:
            scores = miner.teacher_scores
            batch["teacher_pos"] = torch.tensor([scores[(miner.pair_query[p], miner.pair_positive[p])] for p in pairs])
            batch["teacher_neg"] = torch.tensor([scores[(miner.pair_query[pairs[o]], d)]
                                                 for o, d in zip(owners, negatives, strict=True)])  # fmt: skip
        return batch


class RetrievalTrainer(Trainer):
    """In-batch contrastive loss over mean-pooled AutoModel outputs with the pairs' negatives, plus Margin-MSE
    distillation when the batch carries teacher scores; mines negatives with the model when a miner asks for it."""

    def __init__(self, *args, temperature: float = 0.05, contrastive_weight: float = 1.0,
                 distill_weight: float = 1.0, miner: NegativeMiner | None = None, **kwargs) -> None:  # fmt: skip
        training = kwargs["args"]
        training.remove_unused_columns = False  # the encodings are not named like model inputs
        if training.metric_for_best_model in ("loss", "eval_loss"):
            training.greater_is_better = False
        if miner is not None and miner.needs_model and training.dataloader_num_workers:
            raise ValueError("retrieval_negative_source dense / mixed re-mines negatives in this process: set "
                             "dataloader_num_workers 0")  # fmt: skip
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.contrastive_weight, self.distill_weight = contrastive_weight, distill_weight
        self.label_names = []
        if miner is not None:
            self.add_callback(MiningCallback(miner, kwargs.get("processing_class")))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q = embed_batch(model, inputs["query_input_ids"], inputs["query_attention_mask"])
        docs = embed_batch(model, inputs["doc_input_ids"], inputs["doc_attention_mask"])
        n = len(q)
        if "neg_input_ids" in inputs:
            docs = torch.cat([docs, embed_batch(model, inputs["neg_input_ids"], inputs["neg_attention_mask"])])
        scores = q @ docs.T / self.temperature
        if "column_mask" in inputs:
            mask = inputs["column_mask"].to(scores.device)
        else:  # another relevant document of the same query in the batch is not a negative
            qids = inputs["query_ids"]
            same = qids[:, None] == qids[None, :]
            same &= ~torch.eye(n, dtype=torch.bool, device=same.device)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[:, :n] = same
        masked = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        loss = self.contrastive_weight * F.cross_entropy(masked, torch.arange(n, device=scores.device))
        if "teacher_pos" in inputs and "neg_owner" in inputs and self.distill_weight:
            owner = inputs["neg_owner"].to(scores.device)
            student_pos = scores[torch.arange(n, device=scores.device), torch.arange(n, device=scores.device)]
            student_neg = scores[owner, n + torch.arange(len(owner), device=scores.device)]
            teacher_pos = inputs["teacher_pos"].to(scores.device)
            loss = loss + self.distill_weight * margin_mse(student_pos[owner], student_neg, teacher_pos[owner],
                                                           inputs["teacher_neg"].to(scores.device))  # fmt: skip
        return (loss, {"scores": masked}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# --- what a run searches with
@dataclass
class SearchState:
    """A loaded run's catalogue, its embeddings and nearest-neighbour index, and its fusion (hybrid)."""

    catalogue: dict[str, str]
    doc_ids: list[str]
    embeddings: np.ndarray | None
    index: ExactIndex | FaissIndex | None
    fusion: dict[str, Any] | None


class RetrievalTask(RankingTask):
    """Bi-encoder: one encoder for queries and documents, retrieval over the whole catalogue (dense, BM25, hybrid)."""

    model_class = AutoModel
    peft_task_type = peft.TaskType.FEATURE_EXTRACTION
    default_metric = "loss"
    trainer_class = RetrievalTrainer
    pipeline_tag = "sentence-similarity"
    card_tags = ("bi-encoder", "retrieval", "feature-extraction")
    request_inputs = RETRIEVAL_INPUTS
    shares_catalogue_work = True  # catalogue encoding and query search split across the processes of a job
    default_top_k = 10

    def __init__(self, config) -> None:
        super().__init__(config)
        self.miner: NegativeMiner | None = None
        self.fusion: dict[str, Any] | None = None
        self._state: SearchState | None = None

    # --- training
    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        args = self.args
        return {"temperature": args.retrieval_temperature, "contrastive_weight": args.retrieval_contrastive_weight,
                "distill_weight": args.retrieval_distill_weight, "miner": self.miner}  # fmt: skip

    def build_miner(self, splits: DatasetDict) -> NegativeMiner:
        """Training pairs of every split with their judged negatives; BM25-mined negatives drawn already."""
        args = self.args
        queries = []
        for role, split in splits.items():
            judged, texts = qrels(split), first_query_texts(split)
            queries += [QueryJudgements(role, q, texts[q], judged[q]) for q in sorted(judged)]
        catalogue = self._catalogue()
        teacher = None
        if args.retrieval_teacher:
            from querytune.tasks.ranking.teacher import TeacherScores

            teacher = TeacherScores(args.retrieval_teacher, args.catalogue_cache_dir,
                                    self.config.training.per_device_eval_batch_size)  # fmt: skip
        miner = NegativeMiner(args, catalogue, queries, search_bm25=self._bm25_ids, search_dense=self._dense_ids,
                              teacher=teacher, seed=self.config.training.seed)  # fmt: skip
        miner.mine_bm25()
        miner.draw(("train", "validation"))
        if not miner.pair_query:
            raise DataError(f"no relevant pairs (label >= relevance_threshold {args.relevance_threshold}) to train on")
        if teacher is not None:
            logger.info("teacher %s: %d pairs scored by the model, the rest from %s", args.retrieval_teacher,
                        teacher.computed, teacher.path)  # fmt: skip
        return miner

    def _bm25_ids(self, queries: list[str], k: int) -> list[list[str]]:
        return [[d for d, _ in hits] for hits in self._bm25(self._catalogue()).search(queries, k)]

    def _dense_ids(self, model, tokenizer, queries: list[str], k: int) -> list[list[str]]:
        """The model's own top k (exact search with catalogue embeddings of the current weights)."""
        catalogue = self._catalogue()
        doc_ids, texts = list(catalogue), list(catalogue.values())
        max_len = self.config.model.max_length(tokenizer)
        batch = self.config.training.per_device_eval_batch_size
        doc_emb = embed_texts(model, tokenizer, texts, max_len, batch)  # weights change: no cache
        idx, _ = top_k(embed_texts(model, tokenizer, queries, max_len, batch), doc_emb, k)
        return [[doc_ids[i] for i in row] for row in idx]

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        max_len = self.config.model.max_length(tokenizer)
        self.miner = miner = self.build_miner(splits)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"query_ids": batch["query_ids"], "pair_ids": batch["pair_ids"]}
            for prefix, column in (("query_", "query"), ("doc_", "positive")):
                enc = tokenizer(batch[column], truncation=True, max_length=max_len)
                out[f"{prefix}input_ids"], out[f"{prefix}attention_mask"] = enc["input_ids"], enc["attention_mask"]
            return out

        encoded = {}
        for offset, role in enumerate(splits):
            pairs = miner.pair_ids(role)
            rows = {"query": [miner.queries[miner.pair_query[p]].text for p in pairs],
                    "positive": [miner.catalogue.get(miner.pair_positive[p], miner.pair_positive[p]) for p in pairs],
                    "query_ids": [miner.pair_query[p] for p in pairs], "pair_ids": pairs}  # fmt: skip
            if not pairs:
                raise DataError(f"split {role!r} has no relevant pairs (label >= relevance_threshold "
                                f"{self.args.relevance_threshold})")  # fmt: skip
            ds = Dataset.from_dict(rows).shuffle(seed=self.config.training.seed + offset)
            encoded[role] = ds.map(encode, batched=True, remove_columns=["query", "positive"],
                                   desc=f"tokenising {role}")  # fmt: skip
        logger.info("retrieval pairs: %s; mined negatives per query: %s (%s)",
                    {r: len(ds) for r, ds in encoded.items()}, self.args.retrieval_negatives,
                    self.args.retrieval_negative_source)  # fmt: skip
        return DatasetDict(encoded)

    def collator(self, tokenizer):
        max_len = self.config.model.max_length(tokenizer)
        return RetrievalCollator(tokenizer, self.miner, max_len)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        return {}  # only the in-batch loss during training; retrieval metrics come from `evaluate_trained`

    def split_metrics(self, trainer: Trainer, dataset, prefix: str) -> dict[str, float]:
        return trainer.evaluate(dataset, metric_key_prefix=prefix)  # only the loss: there are no per-pair outputs

    def evaluate_trained(self, trainer: Trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """The loss, then (hybrid) the fusion chosen on the validation queries, then the catalogue metrics."""
        metrics = {}
        if role == "validation" and self.args.retrieval_mode == "hybrid":  # every rank: the work is shared
            record = self.choose_fusion(trainer.model, trainer.processing_class, out_dir,
                                        trainer.args.per_device_eval_batch_size)  # fmt: skip
            metrics["eval_fusion_ndcg@10"] = record["validation_ndcg@10"]
        return {**super().evaluate_trained(trainer, dataset, role, out_dir), **metrics}

    # --- search
    def _index(self, model, tokenizer, catalogue: dict[str, str], batch_size: int) -> tuple[np.ndarray, Any]:
        """Catalogue embeddings (cached by weights) and the index `retrieval_index` names over them."""
        args = self.args
        doc_ids, texts = list(catalogue), list(catalogue.values())
        key = catalogue_key(model, doc_ids, texts, self.config.model.max_seq_length)
        emb = catalogue_embeddings(model, tokenizer, doc_ids, texts, self.config.model.max_length(tokenizer),
                                   args.catalogue_cache_dir, batch_size, key, args.catalogue_chunk_rows)  # fmt: skip
        cache = index_cache_path(_cache_folder(args.catalogue_cache_dir), key, args.retrieval_faiss_factory)
        return emb, build_index(emb, args.retrieval_index, args.retrieval_faiss_factory, args.retrieval_faiss_params,
                                cache)  # fmt: skip

    def _dense(self, model, tokenizer, queries: list[str], doc_ids: list[str], index, k: int,
               batch_size: int) -> list[Ranked]:  # fmt: skip
        emb = embed_texts(model, tokenizer, queries, self.config.model.max_length(tokenizer), batch_size)
        idx, scores = index.search(emb, k)
        return [[(doc_ids[i], float(s)) for i, s in zip(row, sc, strict=True) if i >= 0]
                for row, sc in zip(idx, scores, strict=True)]  # fmt: skip

    def rank(self, model, tokenizer, queries: list[str], catalogue: dict[str, str], k: int, mode: str,
             index=None, fusion: dict[str, Any] | None = None,
             batch_size: int = 128) -> tuple[list[Ranked], dict[str, list[Ranked]]]:  # fmt: skip
        """Each query's top k in `mode`, and (hybrid) the two runs that were fused, at the fusion depth.

        Under N processes every rank searches its share of the queries and all get every ranking (`sharded_map`).
        """
        if mode != "bm25" and index is None:
            index = self._index(model, tokenizer, catalogue, batch_size)[1]
        if mode == "hybrid" and fusion is None:
            raise ValueError("hybrid retrieval needs a fusion record (chosen on validation queries)")

        def local(part: list[str]) -> list[tuple[Ranked, dict[str, Ranked]]]:
            hits, runs = self._rank_here(model, tokenizer, part, catalogue, k, mode, index, fusion, batch_size)
            return [(h, {name: run[i] for name, run in runs.items()}) for i, h in enumerate(hits)]

        rows = sharded_map(local, queries)
        names = list(rows[0][1]) if rows else []
        return [hits for hits, _ in rows], {name: [runs[name] for _, runs in rows] for name in names}

    def _rank_here(self, model, tokenizer, queries: list[str], catalogue: dict[str, str], k: int, mode: str, index,
                   fusion: dict[str, Any] | None, batch_size: int) -> tuple[list[Ranked], dict[str, list[Ranked]]]:  # fmt: skip
        """`rank` for the queries this process searches."""
        if mode == "bm25":
            return self._bm25(catalogue).search(queries, k), {}
        if mode == "dense":
            return self._dense(model, tokenizer, queries, list(catalogue), index, k, batch_size), {}
        depth = max(k, fusion.get("depth") or self.args.retrieval_fusion_depth or self.args.retrieval_top_k)
        parts = {"bm25": self._bm25(catalogue).search(queries, depth),
                 "dense": self._dense(model, tokenizer, queries, list(catalogue), index, depth, batch_size)}  # fmt: skip
        keys = [str(i) for i in range(len(queries))]  # by position: two equal queries are still two queries
        fused = fuse(fusion, dict(zip(keys, parts["bm25"], strict=True)), dict(zip(keys, parts["dense"], strict=True)),
                     k)  # fmt: skip
        return [fused[key] for key in keys], parts

    def retrieve(self, model, tokenizer, queries: list[str], catalogue: dict[str, str], k: int,
                 batch_size: int = 128) -> list[Ranked]:  # fmt: skip
        """Dense top k (kept for scripts: zero-shot baselines)."""
        return self.rank(model, tokenizer, queries, catalogue, k, "dense", batch_size=batch_size)[0]

    def choose_fusion(self, model, tokenizer, out_dir: Path | None, batch_size: int = 128) -> dict[str, Any]:
        """The hybrid fusion chosen on the validation queries only; saved in `out_dir` (the run directory)."""
        if self.data is None or "validation" not in self.data.splits:
            raise DataError("retrieval_mode hybrid chooses its fusion on validation queries: the data has none")
        split = self.data.splits["validation"]
        judged, texts = qrels(split), first_query_texts(split)
        ids = list(judged)
        depth = self.args.retrieval_fusion_depth or self.args.retrieval_top_k
        catalogue = self._catalogue()
        index = self._index(model, tokenizer, catalogue, batch_size)[1]
        queries = [texts[q] for q in ids]
        bm25 = sharded_map(lambda part: self._bm25(catalogue).search(part, depth), queries)
        dense = sharded_map(lambda part: self._dense(model, tokenizer, part, list(catalogue), index, depth, batch_size),
                            queries)  # fmt: skip
        record = choose_fusion(judged, dict(zip(ids, bm25, strict=True)), dict(zip(ids, dense, strict=True)),
                               self.args.relevance_gain_offset, self.args.retrieval_fusion, depth)  # fmt: skip
        record["chosen_on"] = "validation"
        self.fusion = record
        if out_dir is not None and world()[0] == 0:
            save_fusion(Path(out_dir) / FUSION_FILE, record)
        return record

    def catalogue_metrics(self, model, tokenizer, split: Dataset, out_dir: Path, role: str,
                          batch_size: int = 128) -> dict[str, float]:  # fmt: skip
        """Search the catalogue for the split's queries in `retrieval_mode`; hybrid also scores its two parts."""
        judged, queries = qrels(split), first_query_texts(split)
        catalogue = self._catalogue()
        ids = list(judged)
        k, mode = self.args.retrieval_top_k, self.args.retrieval_mode
        if mode == "hybrid" and self.fusion is None:
            self.choose_fusion(model, tokenizer, out_dir, batch_size)
        hits, parts = self.rank(model, tokenizer, [queries[q] for q in ids], catalogue, k, mode,
                                fusion=self.fusion, batch_size=batch_size)  # fmt: skip
        runs = dict(zip(ids, hits, strict=True))
        if world()[0] == 0:
            write_rankings(out_dir / f"{role}_rankings.jsonl", runs, queries, catalogue, judged)
        recall = tuple(sorted({10, k}))
        metrics = ranking_metrics(runs, judged, self.args, recall_k=recall)
        for name, part in parts.items():
            found = ranking_metrics({q: h[:k] for q, h in zip(ids, part, strict=True)}, judged, self.args, recall)
            metrics.update({f"{name}_{m}": v for m, v in found.items() if not m.startswith("num_")})
        return metrics

    # --- a loaded run
    def search_state(self, run) -> SearchState:
        """What `run` searches with, loaded once: from the export's files, or the run's data and cached embeddings."""
        if self._state is not None:
            return self._state
        args, folder = self.args, Path(run.run_dir)
        if (folder / EMBEDDINGS_FILE).is_file() or (run.is_export and (folder / CATALOGUE_FILE).is_file()):
            # an export carries its catalogue and embeddings
            catalogue = read_carried_catalogue(folder / CATALOGUE_FILE)
            emb = np.load(folder / EMBEDDINGS_FILE) if (folder / EMBEDDINGS_FILE).is_file() else None
            index = None
            if emb is not None and args.retrieval_index == "faiss":
                index = FaissIndex(emb, args.retrieval_faiss_factory, args.retrieval_faiss_params,
                                   folder / INDEX_FILE if (folder / INDEX_FILE).is_file() else None)  # fmt: skip
            elif emb is not None:
                index = ExactIndex(emb)
        else:
            catalogue = self._catalogue()
            emb, index = None, None
            if args.retrieval_mode != "bm25":
                emb, index = self._index(run.model, run.tokenizer, catalogue, 128)
        if index is None and args.retrieval_mode != "bm25":
            raise DataError(f"{run.run_dir}: no catalogue embeddings to search ({EMBEDDINGS_FILE})")
        fusion = load_fusion(folder) if args.retrieval_mode == "hybrid" else None
        self._state = SearchState(catalogue, list(catalogue), emb, index, fusion)
        return self._state

    def search_unsupported(self) -> str | None:
        return None

    def prepare_search(self, run) -> None:
        state = self.search_state(run)
        if self.args.retrieval_mode != "dense":
            self._bm25(state.catalogue)
        if state.fusion is not None:  # load ranx's compiled kernels now, not in the first request
            fuse(state.fusion, {"q": [("a", 1.0)]}, {"q": [("a", 1.0)]}, 1)

    def search_hits(self, run, queries: list[str], k: int, mode: str | None = None,
                    batch_size: int = 64) -> list[Ranked]:  # fmt: skip
        """Each query's top k over the run's own catalogue, in `mode` (default: the run's retrieval_mode)."""
        state = self.search_state(run)
        mode = mode or self.args.retrieval_mode
        fusion = state.fusion if state.fusion is not None or mode != "hybrid" else load_fusion(run.run_dir)
        return self.rank(run.model, run.tokenizer, queries, state.catalogue, k, mode, state.index, fusion,
                         batch_size)[0]  # fmt: skip

    def search(self, run, queries: list[str], top_k: int = 10, batch_size: int = 64) -> list[dict[str, Any]]:
        catalogue = self.search_state(run).catalogue
        hits = self.search_hits(run, queries, max(1, top_k), batch_size=batch_size)
        return [{"query": q, "mode": self.args.retrieval_mode,
                 "hits": [{"rank": r + 1, "id": d, "title": catalogue.get(d, d), "score": round(s, 6)}
                          for r, (d, s) in enumerate(h)]} for q, h in zip(queries, hits, strict=True)]  # fmt: skip

    def predict(self, run, texts: list[str], top_k: int = 10, batch_size: int = 64, candidates: list[str] | None = None,
                catalogue: str | None = None, **inputs) -> list[dict[str, Any]]:  # fmt: skip
        """The top_k catalogue documents per query in the run's mode (candidates, when given, are the catalogue)."""
        k, mode = max(1, top_k), self.args.retrieval_mode
        if candidates or catalogue:
            docs = {c: c for c in candidates} if candidates else self._catalogue(catalogue)
            index = None
            if candidates and mode != "bm25":  # a request's own few documents: embedded, never cached
                index = ExactIndex(embed_texts(run.model, run.tokenizer, list(docs), self.config.model.max_length(run.tokenizer),
                                               batch_size))  # fmt: skip
            fusion = load_fusion(run.run_dir) if mode == "hybrid" else None
            hits = self.rank(run.model, run.tokenizer, texts, docs, k, mode, index, fusion, batch_size)[0]
        else:
            docs = self.search_state(run).catalogue
            hits = self.search_hits(run, texts, k, batch_size=batch_size)
        return [{"query": q, "mode": mode, "ranked": [{"rank": r + 1, "doc_id": d, "text": docs[d], "score": round(s, 6)}
                                                      for r, (d, s) in enumerate(h)]}
                for q, h in zip(texts, hits, strict=True)]  # fmt: skip

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        ds = self._eval_split(split)
        if self.args.retrieval_mode == "hybrid":
            self.fusion = load_fusion(run.run_dir)  # the one chosen on validation at training time
        found = self.catalogue_metrics(run.model, run.tokenizer, ds, out_dir, split, batch_size)
        return {"num_queries": len(set(ds["query_id"])), "num_pairs": len(ds), **found}

    # --- export: the query encoder, verified by the catalogue documents it ranks first
    def export_files(self, run, out_dir: Path) -> list[str]:
        """The catalogue, its embeddings by the PyTorch run, the fusion (hybrid) and the faiss index (if used)."""
        state = self.search_state(run)
        if state.embeddings is None:  # a bm25-mode run: its query encoder is exported and verified all the same
            state.embeddings, state.index = self._index(run.model, run.tokenizer, state.catalogue, 128)
        write_catalogue(out_dir / CATALOGUE_FILE, state.catalogue)
        written = [CATALOGUE_FILE]
        if state.embeddings is not None:
            np.save(out_dir / EMBEDDINGS_FILE, state.embeddings)
            written.append(EMBEDDINGS_FILE)
        if isinstance(state.index, FaissIndex):
            state.index.write(out_dir / INDEX_FILE)
            written.append(INDEX_FILE)
        if state.fusion is not None:
            save_fusion(out_dir / FUSION_FILE, state.fusion)
            written.append(FUSION_FILE)
        return written

    def verification_texts(self, run, split: str) -> tuple[list[str], list[str] | None]:
        return list(first_query_texts(self._eval_split(split)).values()), None

    def verification_outputs(self, run, texts, pairs, batch_size: int = 64) -> dict[str, Any]:
        """Cosine of each query with every catalogue document: top-1 is the product the query finds first."""
        state = self.search_state(run)
        if state.embeddings is None:
            raise DataError(f"{run.run_dir}: no catalogue embeddings to verify the query encoder against")
        emb = embed_texts(run.model, run.tokenizer, texts, self.config.model.max_length(run.tokenizer), batch_size)
        return {"scores": emb @ state.embeddings.T}
