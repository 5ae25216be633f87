"""Hybrid retrieval: fuse a BM25 run and a dense run with ranx, the fusion chosen on validation queries only.

Three fusions are tried (`retrieval_fusion: auto`) or one is fixed:

- `rrf`: reciprocal rank fusion, `sum 1 / (k + rank)`; k chosen from 10, 20, ..., 100;
- `min-max`: weighted sum of the scores min-max normalised per query; the weight chosen in steps of 0.05;
- `z-score`: weighted sum of the scores z-normalised per query (ranx's `zmuv`); the weight chosen likewise.

`choose_fusion` is given judgements and runs of the validation queries and nothing else, and returns the best
fusion by nDCG@10 (linear gain `label - relevance_gain_offset`, as querytune's ranking metric); the record is saved
in the run directory as `retrieval_fusion.json` and read back at predict / eval / serve time by `fuse`.

ranx compiles its kernels with numba on first use (tens of seconds); the compiled code is cached in
`NUMBA_CACHE_DIR`, which defaults here to ~/.cache/querytune/numba so that it survives fresh virtual environments
and read-only site-packages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FUSION_FILE = "retrieval_fusion.json"
COMPONENTS = ("bm25", "dense")  # the order of the runs (and weights) in a fusion record
METRIC = "ndcg@10"
_NORMS = {"min-max": "min-max", "z-score": "zmuv"}
# ranx (numba) compiles its kernels for the width of the longest document id of a run, so every new width would mean
# a new compilation (seconds to minutes, in the middle of a search request): documents are passed as codes of one
# fixed width, their place in a per-call vocabulary. A query's empty run holds one stand-in code (ranx cannot hold
# a query without documents).
_WIDTH = 12
_EMPTY = "~" * _WIDTH

Ranked = list[tuple[str, float]]


def _ranx():
    from querytune.extras import require

    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path("~/.cache/querytune/numba").expanduser()))
    return require("ranx", extra="search", feature="fusion (hybrid retrieval, rerank_interpolation)")


def ranx_qrels(judged: dict[str, dict[str, float]], gain_offset: float) -> dict[str, dict[str, int]]:
    """ranx holds integer grades: the gain `label - gain_offset` in hundredths (nDCG with linear gain is unchanged
    by the scale); documents without gain are left out, and so are queries with none."""
    out = {}
    for q, labels in judged.items():
        gains = {d: round((y - gain_offset) * 100) for d, y in labels.items()}
        gains = {d: g for d, g in gains.items() if g > 0}
        if gains:
            out[q] = gains
    return out


class _Codes:
    """Document id <-> fixed-width code, for one call."""

    def __init__(self) -> None:
        self.codes: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    def __call__(self, doc_id: str) -> str:
        code = self.codes.get(doc_id)
        if code is None:
            code = self.codes[doc_id] = f"{len(self.codes):0{_WIDTH}d}"
            self.ids[code] = doc_id
        return code


def _run(runs: dict[str, Ranked], queries: list[str], name: str, codes: _Codes):
    ranx = _ranx()
    data = {q: {codes(d): float(s) for d, s in runs.get(q, [])} or {_EMPTY: 0.0} for q in queries}
    return ranx.Run(data, name=name)


def choose_fusion(judged: dict[str, dict[str, float]], bm25: dict[str, Ranked], dense: dict[str, Ranked],
                  gain_offset: float, fusion: str = "auto", depth: int | None = None,
                  names: tuple[str, str] = COMPONENTS) -> dict[str, Any]:  # fmt: skip
    """The best fusion of the two runs on these (validation) judgements, as a record for `fuse` and the run dir.
    `names` name the two runs in the record (BM25 and dense for hybrid search; other pairs fuse the same way)."""
    ranx = _ranx()
    qrels = ranx_qrels(judged, gain_offset)
    if not qrels:
        raise ValueError("choosing the hybrid fusion needs validation queries with a relevant document; none has one")
    queries = sorted(qrels)
    codes = _Codes()
    runs = [_run(bm25, queries, names[0], codes), _run(dense, queries, names[1], codes)]
    qrels_ranx = ranx.Qrels({q: {codes(d): g for d, g in gains.items()} for q, gains in qrels.items()})
    tried: dict[str, float] = {}
    best: dict[str, Any] | None = None
    options = ["rrf", "min-max", "z-score"] if fusion == "auto" else [fusion]
    for option in options:
        method, norm = ("rrf", None) if option == "rrf" else ("wsum", _NORMS[option])
        extra = {} if method == "rrf" else {"step": 0.05}
        params, report = ranx.optimize_fusion(qrels_ranx, runs, norm=norm, method=method, metric=METRIC,
                                              return_optimization_report=True, show_progress=False, **extra)  # fmt: skip
        # ranx keeps [] when no setting scores above 0 (e.g. no relevant document in either run): use the default.
        if method == "rrf":
            params = {"k": int(params["k"]) if params["k"] != [] else 60}
        else:
            params = {"weights": [float(w) for w in params["weights"]] or [0.5, 0.5]}
        record = {"fusion": option, "method": method, "norm": norm, "params": params}
        fused = ranx.fuse(runs, norm=norm, method=method, params=_ranx_params(params))
        record["validation_" + METRIC] = score = float(ranx.evaluate(qrels_ranx, fused, METRIC))
        tried.update({f"{option} {_plain(c)}": round(float(r), 5)
                      for c, r in zip(report.configs, report.results, strict=True)})  # fmt: skip
        if best is None or score > best["validation_" + METRIC]:
            best = record
    assert best is not None
    single = {name: float(ranx.evaluate(qrels_ranx, run, METRIC)) for name, run in zip(names, runs, strict=True)}
    best |= {"runs": list(names), "metric": METRIC, "depth": depth, "validation_queries": len(queries),
             "validation_components": single, "tried": tried}  # fmt: skip
    logger.info("fusion of %s chosen on %d validation queries: %s %s (%s %.4f; %s)", " + ".join(names), len(queries),
                best["fusion"], best["params"], METRIC, best["validation_" + METRIC],
                ", ".join(f"{n} {v:.4f}" for n, v in single.items()))  # fmt: skip
    return best


def _plain(config) -> str:
    """ranx names a weight setting by its tuple's repr; numpy 2 writes np.float64(0.3) for 0.3."""
    return re.sub(r"np\.float64\(([^)]*)\)", r"\1", str(config))


def _ranx_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def fuse(record: dict[str, Any], bm25: dict[str, Ranked], dense: dict[str, Ranked], k: int) -> dict[str, Ranked]:
    """The fused top k of every query of the runs, with the fusion of `record`."""
    ranx = _ranx()
    queries = list(dict.fromkeys([*bm25, *dense]))
    if not queries:
        return {}
    codes = _Codes()
    fused = ranx.fuse([_run(bm25, queries, "bm25", codes), _run(dense, queries, "dense", codes)], norm=record["norm"],
                      method=record["method"], params=_ranx_params(record["params"])).to_dict()  # fmt: skip
    out = {}
    for q in queries:
        ranked = [(codes.ids[c], float(s)) for c, s in fused.get(q, {}).items() if c != _EMPTY]
        out[q] = sorted(ranked, key=lambda x: -x[1])[:k]
    return out


def save_fusion(path: Path, record: dict[str, Any]) -> None:
    from querytune.runs import write_json_atomic

    write_json_atomic(path, record)


def load_fusion(folder: str | Path) -> dict[str, Any]:
    """The fusion saved in a run or export directory (a clear error where there is none)."""
    path = Path(folder) / FUSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {FUSION_FILE}: a hybrid search needs the fusion chosen on "
                                "validation queries; train the retrieval run with retrieval_mode: hybrid")  # fmt: skip
    record = json.loads(path.read_text())
    for key in ("method", "norm", "params"):
        if key not in record:
            raise ValueError(f"{path}: no {key!r} in the fusion record")
    return record
