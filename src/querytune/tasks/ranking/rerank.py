"""`task: rerank`: a cross-encoder over (query, document) pairs that reorders a first stage's candidates.

`AutoModelForSequenceClassification` with one output. The objective is `rerank_objective`: `regression` (MSE on
the graded label; RMSE is reported), `binary` (BCE on `label >= relevance_threshold`), `graded` (BCE on the gain
scaled to [0, 1]) or `listwise` (softmax cross-entropy over each query's documents in a batch, target proportional
to the gain; batches are cut from whole queries by `QueryGroupSampler`). Judged pairs are mostly relevant, so
`rerank_negatives` adds unjudged catalogue documents per query (from its BM25 hits, the catalogue at random, or
both) labelled irrelevant. Only the document is truncated (`truncation="only_second"`); a query longer than half of
`max_seq_length` is the one case where the query is cut too (`longest_first`, logged). At evaluation it reorders the
BM25 top `retrieval_top_k` of the whole catalogue (or, with `rerank_first_stage: judged`, only the judged documents).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import peft
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch.utils.data import Sampler
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, EvalPrediction, Trainer

from querytune.data import DataError
from querytune.metrics import load_metric
from querytune.tasks.ranking.args import RERANK_INPUTS
from querytune.tasks.ranking.common import RankingTask, encode_pairs, ranking_metrics, score_pairs, write_rankings
from querytune.tasks.ranking.data import COLUMNS, first_query_texts, load_ranking_data, qrels
from querytune.tasks.ranking.fusion import choose_fusion, fuse, save_fusion

logger = logging.getLogger(__name__)

INTERPOLATION_FILE = "rerank_interpolation.json"
INTERPOLATED = ("first_stage", "cross_encoder")  # the runs of a rerank_interpolation fusion, in order


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


class RerankTask(RankingTask):
    """Cross-encoder over (query, document) pairs, scored per query."""

    model_class = AutoModelForSequenceClassification
    peft_task_type = peft.TaskType.SEQ_CLS
    default_metric = "judged_ndcg@10"
    trainer_class = RerankTrainer
    pipeline_tag = "text-ranking"
    card_tags = ("cross-encoder", "reranking")
    request_inputs = RERANK_INPUTS
    default_top_k = 0  # every candidate, ranked
    verification_grouped = True  # compare the best document of each query

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        args = self.args
        return {"objective": args.rerank_objective, "threshold": args.relevance_threshold,
                "gain_offset": args.relevance_gain_offset, "gain_max": max(self.data.splits["train"]["label"])}  # fmt: skip

    def with_negatives(self, splits: DatasetDict) -> DatasetDict:
        """Train and validation plus `rerank_negatives` sampled unjudged documents per query (test is left as is)."""
        args = self.args
        if not args.rerank_negatives:
            return splits
        catalogue = self._catalogue()
        label = args.rerank_negative_label
        label = float(min(splits["train"]["label"])) if label is None else label
        share = {"bm25": 1.0, "random": 0.0, "mixed": 0.5}[args.rerank_negative_source]
        out = dict(splits)
        for offset, role in enumerate(("train", "validation")):
            if role not in splits:
                continue
            hits = None
            if share:
                texts = first_query_texts(splits[role])
                ids = sorted(texts)
                found = self._bm25(catalogue).search([texts[q] for q in ids], args.retrieval_top_k)
                hits = {q: [d for d, _ in h] for q, h in zip(ids, found, strict=True)}
            out[role] = sample_negatives(splits[role], catalogue, args.rerank_negatives, label,
                                         self.config.training.seed + offset, hits, share)  # fmt: skip
            logger.info("%s: %d judged pairs + %d sampled negatives (%s, label %g)", role, len(splits[role]),
                        len(out[role]) - len(splits[role]), args.rerank_negative_source, label)  # fmt: skip
        return DatasetDict(out)

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        max_len = self.config.model.max_length(tokenizer)
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
        regression = self.args.rerank_objective == "regression"
        metrics = load_metric("ranking").compute(
            predictions=scores.tolist(), references=np.asarray(labels, dtype=float).tolist(),
            query_ids=[str(int(q)) for q in query_ids], doc_ids=[str(i) for i in range(len(scores))], rmse=regression,
            gain_offset=self.args.relevance_gain_offset, relevance_threshold=self.args.relevance_threshold,
        )  # fmt: skip
        keep = ("ndcg@5", "ndcg@10", "mrr@10", "map")
        out = {f"judged_{k}": v for k, v in metrics.items() if k in keep}
        if regression:
            out["rmse"] = metrics["rmse"]
        return out

    # --- the first stage: what the cross-encoder reorders
    def retrieval_run(self):
        """The finished retrieval run of `rerank_first_stage` dense / hybrid, loaded once."""
        if getattr(self, "_retrieval_run", None) is None:
            from querytune.inference import LoadedRun

            path = self.args.rerank_retrieval_run
            if not path or not Path(path).is_dir():
                raise DataError(f"rerank_retrieval_run: {path!r} is not a run directory (rerank_first_stage "
                                f"{self.args.rerank_first_stage} needs a finished retrieval run)")  # fmt: skip
            loaded = LoadedRun(path, merge=True, device="cpu")
            if loaded.config.data.task != "retrieval":
                raise DataError(f"rerank_retrieval_run: {path} is a {loaded.config.data.task!r} run, not a retrieval "
                                "run")  # fmt: skip
            self._retrieval_run = loaded
        return self._retrieval_run

    def first_stage(self, queries: list[str], catalogue: dict[str, str] | None, k: int,
                    batch_size: int = 128) -> list[list[tuple[str, float]]]:  # fmt: skip
        """Each query's candidates from `rerank_first_stage` (bm25 over `catalogue`, or the retrieval run)."""
        stage = self.args.rerank_first_stage
        if stage == "bm25":
            return self._bm25(catalogue).search(queries, k)
        retrieval = self.retrieval_run()
        own = retrieval.task.search_state(retrieval).catalogue
        if catalogue is not None and own.keys() != catalogue.keys():
            raise DataError(f"rerank_retrieval_run {self.args.rerank_retrieval_run} searches another catalogue "
                            f"({len(own)} documents) than this run ({len(catalogue)}): train both on the same data "
                            "and catalogue_file")  # fmt: skip
        return retrieval.task.search_hits(retrieval, queries, k, mode=stage, batch_size=batch_size)

    def check_first_stage_queries(self, queries: set[str], role: str) -> None:
        """The retrieval run must not have trained on the queries it retrieves for here (nor chosen its fusion on
        them, when they are test queries)."""
        if self.args.rerank_first_stage not in ("dense", "hybrid"):
            return
        retrieval = self.retrieval_run()
        cfg = retrieval.config
        try:
            seen = load_ranking_data(cfg.data, cfg.task_args, cfg.training.seed).splits
        except Exception as err:  # noqa: BLE001  (its data may be gone: say so, but do not block the evaluation)
            logger.warning("could not read the data of rerank_retrieval_run to check its splits: %s", err)
            return
        used = ("train", "validation") if role == "test" else ("train",)
        for name in used:
            if name in seen:
                shared = queries & set(seen[name]["query_id"])
                if shared:
                    raise DataError(f"rerank_retrieval_run {self.args.rerank_retrieval_run} used {len(shared)} of the "
                                    f"{len(queries)} {role} queries in its {name} split (e.g. {sorted(shared)[0]!r}): "
                                    "train it on the same split rule (ranking_split_seed, percentages)")  # fmt: skip

    def rerank_split(self, model, tokenizer, split: Dataset, batch_size: int = 128,
                     role: str = "test") -> tuple[dict, dict, dict | None]:  # fmt: skip
        """First stage (BM25 or a retrieval run over the catalogue, or the judged documents) then the cross-encoder:
        the reranked lists, the judgements, and the first stage's own lists (None for judged)."""
        args = self.args
        judged = qrels(split)
        queries = first_query_texts(split)
        catalogue = self._catalogue()
        first = None
        if args.rerank_first_stage == "judged":
            candidates = {q: list(docs) for q, docs in judged.items()}
        else:
            ids = list(judged)
            self.check_first_stage_queries(set(ids), role)
            hits = self.first_stage([queries[q] for q in ids], catalogue, args.retrieval_top_k, batch_size)
            first = dict(zip(ids, hits, strict=True))
            candidates = {q: [d for d, _ in h] for q, h in first.items()}
        pairs = [(q, d) for q, docs in candidates.items() for d in docs]
        scores = score_pairs(model, tokenizer, [queries[q] for q, _ in pairs], [catalogue.get(d, d) for _, d in pairs],
                             self.config.model.max_length(tokenizer), batch_size)  # fmt: skip
        runs: dict[str, list[tuple[str, float]]] = {q: [] for q in judged}
        for (q, d), s in zip(pairs, scores, strict=True):
            runs[q].append((d, float(s)))
        for q in runs:
            runs[q].sort(key=lambda x: -x[1])
        return runs, judged, first

    def choose_interpolation(self, model, tokenizer, out_dir: Path, batch_size: int = 128) -> dict[str, Any]:
        """`rerank_interpolation`: the fusion of first-stage and cross-encoder scores chosen on the validation
        queries only (reranked here), saved in `out_dir`."""
        if self.data is None or "validation" not in self.data.splits:
            raise DataError("rerank_interpolation chooses its fusion on validation queries: the data has none")
        runs, judged, first = self.rerank_split(model, tokenizer, self.data.splits["validation"], batch_size,
                                                "validation")  # fmt: skip
        record = choose_fusion(judged, first, runs, self.args.relevance_gain_offset, self.args.retrieval_fusion,
                               self.args.retrieval_top_k, names=INTERPOLATED)  # fmt: skip
        record |= {"chosen_on": "validation", "first_stage": self.args.rerank_first_stage}
        save_fusion(Path(out_dir) / INTERPOLATION_FILE, record)
        return record

    def catalogue_metrics(self, model, tokenizer, split: Dataset, out_dir: Path, role: str,
                          batch_size: int = 128) -> dict[str, float]:  # fmt: skip
        runs, judged, first = self.rerank_split(model, tokenizer, split, batch_size, role)
        k = self.args.retrieval_top_k
        recall_k = tuple(sorted({10, k}))
        metrics: dict[str, float] = {}
        if self.args.rerank_interpolation and first is not None and role != "validation":
            record = self.choose_interpolation(model, tokenizer, out_dir, batch_size)
            found = ranking_metrics(runs, judged, self.args, recall_k=recall_k)
            metrics.update({f"cross_encoder_{m}": v for m, v in found.items() if not m.startswith("num_")})
            runs = fuse(record, first, runs, k)
            metrics["interpolation_validation_ndcg@10"] = record["validation_ndcg@10"]
        write_rankings(out_dir / f"{role}_rankings.jsonl", runs, first_query_texts(split), self._catalogue(), judged)
        metrics.update(ranking_metrics(runs, judged, self.args, recall_k=recall_k))
        if first is not None:  # what the first stage alone scored on the same queries
            found = ranking_metrics(first, judged, self.args, recall_k=recall_k)
            metrics.update({f"first_stage_{m}": v for m, v in found.items() if not m.startswith("num_")})
        return metrics

    # --- search (`POST /search`): the first stage over the catalogue, then the cross-encoder
    def search_unsupported(self) -> str | None:
        if self.args.rerank_first_stage == "judged":
            return "rerank_first_stage judged has no first stage to search a catalogue with"
        return None

    def prepare_search(self, run) -> None:
        if self.args.rerank_first_stage == "bm25":
            self._bm25(self._catalogue())
        else:
            retrieval = self.retrieval_run()
            retrieval.task.prepare_search(retrieval)

    def search(self, run, queries: list[str], top_k: int = 10, batch_size: int = 64) -> list[dict[str, Any]]:
        """The first stage's top retrieval_top_k reordered by the cross-encoder; the best top_k of them."""
        catalogue = self._catalogue() if self.args.rerank_first_stage == "bm25" else None
        hits = self.first_stage(queries, catalogue, self.args.retrieval_top_k, batch_size)
        if catalogue is None:
            retrieval = self.retrieval_run()
            catalogue = retrieval.task.search_state(retrieval).catalogue
        results = []
        for query, found in zip(queries, hits, strict=True):
            docs = [d for d, _ in found]
            scores = score_pairs(run.model, run.tokenizer, [query] * len(docs), [catalogue[d] for d in docs],
                                 self.config.model.max_length(run.tokenizer), batch_size) if docs else np.zeros(0)  # fmt: skip
            order = np.argsort(-scores, kind="stable")[: max(1, top_k)]
            results.append({"query": query, "mode": f"{self.args.rerank_first_stage} + rerank",
                            "hits": [{"rank": r + 1, "id": docs[i], "title": catalogue[docs[i]],
                                      "score": round(float(scores[i]), 6)} for r, i in enumerate(order)]})  # fmt: skip
        return results

    def predict(self, run, texts: list[str], top_k: int = 0, batch_size: int = 64, candidates: list[str] | None = None,
                **inputs) -> list[dict[str, Any]]:  # fmt: skip
        """Each query's candidates ranked by the cross-encoder (all of them unless top_k is smaller)."""
        if not candidates:
            raise ValueError("rerank: no candidates; pass --candidates, --candidates_file or candidates on stdin")
        results = []
        for query in texts:
            scores = score_pairs(run.model, run.tokenizer, [query] * len(candidates), candidates,
                                 self.config.model.max_length(run.tokenizer), batch_size)  # fmt: skip
            order = np.argsort(-scores, kind="stable")[: top_k if top_k > 0 else None]
            ranked = [{"rank": r + 1, "text": candidates[i], "score": round(float(scores[i]), 6)}
                      for r, i in enumerate(order)]  # fmt: skip
            results.append({"query": query, "ranked": ranked})
        return results

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        ds = self._eval_split(split)
        judged = qrels(ds)
        scores = score_pairs(run.model, run.tokenizer, ds["query"], ds["document"], self.config.model.max_length(run.tokenizer),
                             batch_size)  # fmt: skip
        ids = {q: i for i, q in enumerate(judged)}
        pointwise = self.compute_metrics(EvalPrediction(predictions=scores, label_ids=(
            np.asarray(ds["label"]), np.asarray([ids[q] for q in ds["query_id"]]))))  # fmt: skip
        found = self.catalogue_metrics(run.model, run.tokenizer, ds, out_dir, split, batch_size)
        return {"num_queries": len(judged), "num_pairs": len(ds), **pointwise, **found}

    # --- export: (query, document) pairs of whole held-out queries; top-1 is each query's best document
    def verification_texts(self, run, split: str) -> tuple[list[str], list[str] | None]:
        ds = self._eval_split(split)
        return list(ds["query"]), list(ds["document"])

    def verification_outputs(self, run, texts, pairs, batch_size: int = 64) -> dict[str, Any]:
        max_len = self.config.model.max_length(run.tokenizer)
        return {"logits": score_pairs(run.model, run.tokenizer, texts, pairs, max_len, batch_size)[:, None]}
