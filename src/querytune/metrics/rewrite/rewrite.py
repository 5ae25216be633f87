"""Query rewriting and expansion metrics, as a 🤗 `evaluate` module loaded by path (offline).

`evaluate.load("rouge")` / `("sacrebleu")` fetch scripts from the Hub, so this module calls rouge-score and sacrebleu
directly. Each prediction is a ranked list of candidates and each reference a list of acceptable outputs.
"""

import datasets
import evaluate
import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-L, BLEU, exact match against any reference, distinct-n, and recall@k of the references."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per query, the generated candidates, best first (may be empty).
    references: per query, the acceptable outputs (at least one).
    k: cut-off of recall@k (default: the longest candidate list).
Returns:
    rougeL (F-measure of the first candidate against the best-matching reference, x100), bleu (sacrebleu corpus
    BLEU, lower-cased, of the first candidates against all references), exact_match (first candidate equals a reference after
    lower-casing and collapsing spaces, x100), recall_at_1 and recall_at_k (share of references found among the
    first 1 / k candidates, x100), distinct_1 and distinct_2 (distinct n-grams / n-grams over all candidates),
    mean_candidates.
"""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _distinct(candidates: list[list[str]], n: int) -> float:
    grams = [tuple(toks[i : i + n]) for cands in candidates for c in cands for toks in [c.lower().split()]
             for i in range(len(toks) - n + 1)]  # fmt: skip
    return len(set(grams)) / len(grams) if grams else 0.0


def _recall(candidates: list[list[str]], references: list[list[str]], k: int) -> float:
    scores = []
    for cands, refs in zip(candidates, references, strict=True):
        found = {_norm(c) for c in cands[:k]}
        wanted = {_norm(r) for r in refs}
        scores.append(len(found & wanted) / len(wanted))
    return float(np.mean(scores)) if scores else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rewrite(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, k=None):
        if any(len(r) == 0 for r in references):
            raise ValueError("every query needs at least one reference")
        firsts = [c[0] if c else "" for c in predictions]
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
                 for pred, refs in zip(firsts, references, strict=True)]  # fmt: skip
        # sacrebleu takes reference streams of equal length: repeat a query's first reference to fill (a duplicate
        # reference changes neither the clipped counts nor the closest reference length).
        width = max(len(r) for r in references)
        streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
        bleu = sacrebleu.corpus_bleu(firsts, streams, lowercase=True).score if firsts else 0.0
        exact = [_norm(p) in {_norm(r) for r in refs} for p, refs in zip(firsts, references, strict=True)]
        k = k or max((len(c) for c in predictions), default=1) or 1
        return {
            "rougeL": 100 * float(np.mean(rouge)) if rouge else 0.0,
            "bleu": float(bleu),
            "exact_match": 100 * float(np.mean(exact)) if exact else 0.0,
            "recall_at_1": 100 * _recall(predictions, references, 1),
            "recall_at_k": 100 * _recall(predictions, references, k),
            "k": int(k),
            "distinct_1": _distinct(predictions, 1),
            "distinct_2": _distinct(predictions, 2),
            "mean_candidates": float(np.mean([len(c) for c in predictions])) if predictions else 0.0,
        }
