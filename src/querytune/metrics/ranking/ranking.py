"""Ranking metrics per query, averaged over queries, as a 🤗 `evaluate` module.

One row per (query, document): `predictions` is the system's score (NaN: judged but not retrieved),
`references` the graded label (NaN: retrieved but unjudged, gain 0 and not relevant).

- nDCG@k with graded linear gain `label - gain_offset` (scikit-learn's `dcg_score`): the run's DCG@k over the
  documents it retrieved, divided by the ideal DCG@k of all judged documents of the query.
- MRR@k, MAP (over the whole run, e.g. MAP@100 for a top-100 run) and Recall@k (pytrec_eval, i.e. trec_eval),
  with `label >= relevance_threshold` as relevant.
- Queries with no positive gain (nDCG) or no relevant document (the binary metrics) are left out of the
  averages, and counted: `num_queries_no_gain`, `num_queries_no_relevant`. A query with relevant documents but
  nothing retrieved scores 0.
- `rmse=True` adds the RMSE of scores against labels over the rows that have both (pointwise regression).
"""

import math

import datasets
import evaluate
import numpy as np
import pytrec_eval
from sklearn.metrics import dcg_score, root_mean_squared_error

_DESCRIPTION = "nDCG@k (graded), MRR@k, MAP, Recall@k per query, averaged; optional RMSE."
_KWARGS_DESCRIPTION = """
Args:
    predictions: score per (query, document) row; NaN = judged but not retrieved.
    references: graded label per row; NaN = unjudged.
    query_ids, doc_ids: strings naming the query and the document of each row.
    ndcg_k: cut-offs for nDCG (default [5, 10]).
    mrr_k: cut-off for MRR (default 10).
    recall_k: cut-offs for recall (default none).
    gain_offset: nDCG gain = label - gain_offset, floored at 0 (default 1.0).
    relevance_threshold: label >= this is relevant for MRR, MAP, recall (default 2.5).
    rmse: also report RMSE of predictions against references (default False).
Returns:
    ndcg@k, mrr@k, map, recall@k, num_queries, num_queries_no_gain, num_queries_no_relevant, and rmse.
"""


def _dcg(gains: list[float], scores: list[float], k: int) -> float:
    # dcg_score needs two documents per query; a zero-gain pad scored below everything adds nothing.
    pad = min(scores) - 1.0
    return float(dcg_score(np.asarray([[*gains, 0.0]]), np.asarray([[*scores, pad]]), k=k))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ranking(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("float64"),
                    "query_ids": datasets.Value("string"),
                    "doc_ids": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, query_ids, doc_ids, ndcg_k=(5, 10), mrr_k=10, recall_k=(),
                 gain_offset=1.0, relevance_threshold=2.5, rmse=False):  # fmt: skip
        run: dict[str, dict[str, float]] = {}
        judged: dict[str, dict[str, float]] = {}
        for score, label, q, d in zip(predictions, references, query_ids, doc_ids, strict=True):
            judged.setdefault(q, {})
            if score is not None and not math.isnan(score):
                run.setdefault(q, {})[d] = float(score)
            if label is not None and not math.isnan(label):
                judged[q][d] = float(label)
        out: dict[str, float] = {}

        # Graded nDCG.
        gained = {q: {d: max(0.0, y - gain_offset) for d, y in docs.items()} for q, docs in judged.items()}
        gained = {q: g for q, g in gained.items() if any(v > 0 for v in g.values())}
        for k in ndcg_k:
            values = []
            for q, gains in gained.items():
                ranked = run.get(q, {})
                if not ranked:
                    values.append(0.0)
                    continue
                ideal = list(gains.values())
                dcg = _dcg([gains.get(d, 0.0) for d in ranked], list(ranked.values()), k)
                values.append(dcg / _dcg(ideal, ideal, k))
            out[f"ndcg@{k}"] = float(np.mean(values)) if values else 0.0

        # Binary metrics through trec_eval.
        relevant = {q: {d: int(y >= relevance_threshold) for d, y in docs.items()} for q, docs in judged.items()}
        relevant = {q: r for q, r in relevant.items() if any(r.values())}
        if relevant:
            measures = {"map", *(f"recall.{k}" for k in recall_k)}
            full = pytrec_eval.RelevanceEvaluator(relevant, measures).evaluate(run)
            top = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:mrr_k]) for q, docs in run.items()}
            rr = pytrec_eval.RelevanceEvaluator(relevant, {"recip_rank"}).evaluate(top)
            # trec_eval scores only queries that retrieved something; the others score 0.
            out[f"mrr@{mrr_k}"] = float(np.mean([rr.get(q, {}).get("recip_rank", 0.0) for q in relevant]))
            out["map"] = float(np.mean([full.get(q, {}).get("map", 0.0) for q in relevant]))
            for k in recall_k:
                out[f"recall@{k}"] = float(np.mean([full.get(q, {}).get(f"recall_{k}", 0.0) for q in relevant]))
        else:
            out[f"mrr@{mrr_k}"] = out["map"] = 0.0
            out.update({f"recall@{k}": 0.0 for k in recall_k})

        out["num_queries"] = len(judged)
        out["num_queries_no_gain"] = len(judged) - len(gained)
        out["num_queries_no_relevant"] = len(judged) - len(relevant)
        if rmse:
            pairs = [(p, y) for p, y in zip(predictions, references, strict=True)
                     if p is not None and y is not None and not math.isnan(p) and not math.isnan(y)]  # fmt: skip
            out["rmse"] = (
                float(root_mean_squared_error([y for _, y in pairs], [p for p, _ in pairs])) if pairs else 0.0
            )
        return out
