"""Which int8 setting agrees with the fp32 run: every setting of `querytune.serving.quantize.QUANT_SETTINGS`, on the
fused and on the plain ONNX graph of a CLINC150 intent run, scored against the PyTorch run.

    python benchmarks/quantization.py --run runs/clinc150-full                       # every setting, both graphs
    python benchmarks/quantization.py --run RUN --settings dynamic-matmul-pc --graphs fused --max_queries 200

For each setting: the graph is quantized exactly as `querytune export --quantize int8 --quantization NAME` does it
(calibration, smoothing and the sensitivity pass on 512 training queries), then top-1 agreement with the PyTorch
run and in-scope / overall accuracy are measured on the validation split (where the setting is chosen) and on the test
split (reported, never used to choose). CLINC150's validation split has only 100 out-of-scope queries, too few to
tell one flipped query from another, so agreement on out-of-scope input is measured on a pool: those 100 plus
"foreign" queries, real queries of other corpora the run never saw (`--foreign`, default up to 1,000 distinct
queries each of MIMICS web searches, Home Depot product searches, SNIPS voice commands and BANKING77 questions;
unlabelled, used for agreement only). The rule: among the settings with agreement >= 99% on in-scope validation
queries and on that out-of-scope pool each, and an in-scope accuracy drop <= 0.5 point, the one with the most MatMuls
in int8 (the speed order, whatever the load; a packed Attention node stays fp32 in any setting). If none qualifies:
the same speed order among the settings whose lower agreement (in-scope or pool) is within 0.5 point of the best
one's (about two standard errors on the ~3,800-query pool), at the same accuracy drop limit. A per-node sensitivity
table shows which quantized nodes move the logits most.

Agreement and accuracy do not depend on the machine's load (the script may run at nice 19 beside other work). The
queries/s column does: it is printed for orientation and marked NOT FINAL unless the machine was quiet (1-minute
load average <= 1.5 when it started; the load after counts its own threads); the final speeds come from
benchmarks/inference.py on a quiet machine.
Writes benchmarks/results/quantization.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import load_average  # noqa: E402

TARGET_AGREEMENT, TARGET_DROP, NEAR_BEST = 99.0, 0.5, 0.5


def read_split(data: Path, split: str, max_queries: int | None) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    rows = rows[:max_queries] if max_queries else rows
    return [r["text"] for r in rows], [r["intent"] for r in rows]


# name: (file under the shared data folder, text column, encoding); queries no CLINC150 run trained on
FOREIGN = {
    "mimics": ("mimics_manual/MIMICS-Manual.tsv", "query", "utf-8"),
    "homedepot": ("homedepot/train.csv", "search_term", "latin-1"),
    "snips": ("snips/test.jsonl", "text", "utf-8"),
    "banking77": ("banking77/test.csv", "text", "utf-8"),
}


def read_foreign(data_root: Path, names: list[str], per_source: int) -> tuple[list[str], list[str]]:
    """`per_source` distinct queries of each named corpus (seed 0), and each query's source name."""
    import pandas as pd

    texts, sources = [], []
    for name in names:
        file, column, encoding = FOREIGN[name]
        path = data_root / file
        if path.suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, encoding=encoding)
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", encoding=encoding)
        queries = sorted({str(q).strip() for q in frame[column].dropna()} - {""})
        random.Random(0).shuffle(queries)
        texts += queries[:per_source]
        sources += [name] * len(queries[:per_source])
    return texts, sources


def scores(logits: np.ndarray, reference: np.ndarray, gold: list[str], labels: list[str], oos: str = "oos") -> dict:
    pred = np.argmax(logits, -1)
    names = np.asarray(labels)[pred]
    gold_a = np.asarray(gold)
    in_scope = gold_a != oos
    same = pred == np.argmax(reference, -1)
    return {"agreement": 100 * float(np.mean(same)), "agreement_in": 100 * float(np.mean(same[in_scope])),
            "agreement_oos": 100 * float(np.mean(same[~in_scope])) if (~in_scope).any() else float("nan"),
            "in_scope": 100 * float(np.mean(names[in_scope] == gold_a[in_scope])),
            "accuracy": 100 * float(np.mean(names == gold_a))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished CLINC150 intent run (full fine-tune or LoRA)")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/clinc150"))
    parser.add_argument("--settings", nargs="+", default=None, help="default: every QUANT_SETTINGS entry")
    parser.add_argument("--graphs", nargs="+", default=["fused", "fused-mha", "plain"],
                        choices=["fused", "fused-mha", "plain"],
                        help="fused: packed Attention (fp32); fused-mha: Q, K, V MatMuls before MultiHeadAttention")  # fmt: skip
    parser.add_argument("--plain_settings", nargs="+", default=None, help="settings tried on the plain graph "
                        "(default: the same as --settings)")  # fmt: skip
    parser.add_argument("--max_queries", type=int, default=None, help="first N (shuffled) queries of each split")
    parser.add_argument("--foreign", nargs="*", default=list(FOREIGN), choices=list(FOREIGN),
                        help="corpora whose queries join the out-of-scope agreement pool (none: validation OOS only)")  # fmt: skip
    parser.add_argument("--foreign_per_source", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/quantization.md"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from querytune.inference import LoadedRun
    from querytune.serving import export as ex
    from querytune.serving import quantize as qz
    from querytune.serving import verify as vf

    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    names = args.settings or list(qz.QUANT_SETTINGS)
    settings = [qz.quant_setting(n) for n in names]
    run = Path(args.run)
    reference = LoadedRun(run, merge=False, device="cpu")
    labels = reference.task.labels
    splits = {s: read_split(Path(args.data), s, args.max_queries) for s in ("validation", "test")}
    print("PyTorch reference logits ...", flush=True)
    foreign, foreign_sources = read_foreign(Path(args.data).parent, args.foreign, args.foreign_per_source)
    ref = {s: reference.logits(texts, batch_size=64) for s, (texts, _) in splits.items()}
    ref["foreign"] = reference.logits(foreign, batch_size=64) if foreign else np.zeros((0, len(labels)))
    fp32 = {s: scores(ref[s], ref[s], splits[s][1], labels) for s in splits}
    val_oos = np.asarray(splits["validation"][1]) == "oos"

    rows, sensitivity_tables, graph_notes = [], {}, {}
    calibration_size = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for graph in args.graphs:
            export_dir = work / f"fp32-{graph}"
            print(f"exporting the {graph} fp32 graph ...", flush=True)
            attention = "mha" if graph == "fused-mha" else "packed"
            info = ex.export_run(run, fmt="onnx", output_dir=export_dir, overwrite=True, optimize=graph != "plain",
                                 attention=attention)  # fmt: skip
            opt = info["optimizer"]
            graph_notes[graph] = (f"fused {opt.get('fused')} (max logit diff vs PyTorch "
                                  f"{opt['check']['max_abs_logit_diff']:.2g})" if opt["applied"]
                                  else f"not fused: {opt['reason']}")  # fmt: skip
            src = export_dir / "model.onnx"
            fp32_loaded = LoadedRun(export_dir, device="cpu", threads=args.threads)
            ctexts, cpairs = vf.training_sample(reference, 512)
            calibration_size = len(ctexts)
            feeds = qz.calibration_feeds(reference, ctexts, cpairs, info["inputs"])
            one_shape = qz.calibration_feeds(reference, ctexts, cpairs, info["inputs"], one_shape=True)
            cache: dict = {}
            ranked = cache[(str(src), ("MatMul",), True)] = qz.sensitivity(src, feeds, ("MatMul",), work, True)
            sensitivity_tables[graph] = ranked
            tried = settings if graph != "plain" or args.plain_settings is None else [
                qz.quant_setting(n) for n in args.plain_settings]  # fmt: skip
            # a setting names the fused graph it is for; the plain graph takes the packed ones (no attention fused)
            tried = [s for s in tried if s.attention == (attention if graph != "plain" else "packed")]
            candidates = [(None, "fp32")] + [(s, s.name) for s in tried]
            for setting, name in candidates:
                dst = work / f"{graph}-{name}.onnx"
                t0 = time.perf_counter()
                record = {"excluded_nodes": []}
                if setting is not None:  # histogram calibration needs one shape, as export's finish_graph does it
                    histogram = setting.static and setting.calibrate_method != "MinMax"
                    record = qz.quantize_graph(src, dst, setting, one_shape if histogram else feeds, work, cache)
                quant_s = time.perf_counter() - t0
                graph_path = dst if setting else src
                row = {"graph": graph, "setting": name, "quantize_s": quant_s, "excluded": record["excluded_nodes"],
                       "int8_matmuls": len(ranked) - len(record["excluded_nodes"]) if setting else 0}  # fmt: skip
                for split, (texts, gold) in splits.items():
                    t0 = time.perf_counter()
                    logits = vf.graph_outputs(fp32_loaded, graph_path, texts, None)["logits"]
                    row[f"{split}_qps"] = len(texts) / (time.perf_counter() - t0)
                    row[split] = scores(logits, ref[split], gold, labels)
                    if split == "validation":
                        val_same = np.argmax(logits, -1) == np.argmax(ref[split], -1)
                foreign_same = np.zeros(0, dtype=bool)
                if foreign:
                    logits = vf.graph_outputs(fp32_loaded, graph_path, foreign, None)["logits"]
                    foreign_same = np.argmax(logits, -1) == np.argmax(ref["foreign"], -1)
                pool = np.concatenate([val_same[val_oos], foreign_same])
                row["oos_pool"] = 100 * float(np.mean(pool))
                row["foreign"] = {name: 100 * float(np.mean(foreign_same[np.asarray(foreign_sources) == name]))
                                  for name in args.foreign}  # fmt: skip
                rows.append(row)
                v = row["validation"]
                t = row["test"]
                print(f"  {graph} {name}: validation agreement {v['agreement']:.2f}% (in {v['agreement_in']:.2f}, "
                      f"OOS {v['agreement_oos']:.2f}, OOS pool {row['oos_pool']:.2f}), in-scope acc {v['in_scope']:.2f} (fp32 "
                      f"{fp32['validation']['in_scope']:.2f}); test agreement {t['agreement']:.2f}% (in "
                      f"{t['agreement_in']:.2f}, OOS {t['agreement_oos']:.2f}); {row['test_qps']:.0f} q/s (not final)",
                      flush=True)  # fmt: skip

    def lower_agreement(row: dict) -> float:
        return min(row["validation"]["agreement_in"], row["oos_pool"])

    def drop_ok(row: dict) -> bool:
        return fp32["validation"]["in_scope"] - row["validation"]["in_scope"] <= TARGET_DROP

    int8 = [r for r in rows if r["setting"] != "fp32"]
    good = [r for r in int8 if drop_ok(r) and lower_agreement(r) >= TARGET_AGREEMENT]
    top = max((lower_agreement(r) for r in int8 if drop_ok(r)), default=0.0)
    near = [r for r in int8 if drop_ok(r) and lower_agreement(r) >= top - NEAR_BEST]
    # Most MatMuls in int8 first: a speed order that does not depend on the machine's load.
    best = max(good or near or int8, key=lambda r: (r["int8_matmuls"], lower_agreement(r)))
    load_after = load_average()
    quiet = load_before <= 1.5  # the load after counts this script's own threads
    speed_note = "" if quiet else " (NOT FINAL: measured beside other work)"

    from querytune.report import machine_description

    oos_share = {split: 100 * float(np.mean([g == "oos" for g in gold])) for split, (_, gold) in splits.items()}

    lines = [
        f"# int8 settings against the fp32 run: {Path(args.data).name}",
        "",
        f"Measured on: {machine_description()}; {args.threads} thread(s). Started {started}; 1-minute load average "
        f"before {load_before:.2f}, after {load_after:.2f}.",
        f"Run: `{run}`. Queries: `{args.data}` validation ({len(splits['validation'][0])}) and test "
        f"({len(splits['test'][0])}), shuffled with seed 0. Command: `python benchmarks/quantization.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "Agreement: top-1 agreement with the PyTorch run on the same queries, over all queries / in-scope ones / "
        "out-of-scope ones (OOS queries have flat logits and flip first; they are "
        f"{oos_share['validation']:.0f}% of validation and {oos_share['test']:.0f}% of test here). "
        f"The OOS pool: the {int(val_oos.sum())} validation OOS queries and {len(foreign)} foreign queries "
        f"({', '.join(f'{foreign_sources.count(n)} {n}' for n in args.foreign) or 'none'}: real queries of other "
        "corpora the run never saw, used for agreement only). The setting is chosen on validation: agreement >= 99% "
        "on in-scope validation queries and on the OOS pool each, in-scope accuracy drop <= 0.5 point, then the "
        "most MatMuls in int8 (the speed order, whatever the load); if none qualifies, the same order among those "
        f"whose lower agreement (in-scope or pool) is within {NEAR_BEST} point of the best one's "
        f"({top:.2f}). Test is reported, never used to choose. "
        f"Calibration, smoothing and the sensitivity pass use {calibration_size} training queries.",
        "",
        *[f"- {g} graph: {note}" for g, note in graph_notes.items()],
        "",
        f"| graph | setting | MatMuls int8 / fp32 | val agreement % (all / in / OOS) | OOS pool agreement % | "
        f"foreign agreement % ({' / '.join(args.foreign)}) | val in-scope acc % | "
        f"test agreement % (all / in / OOS) | test in-scope acc % | test acc % | queries/s{speed_note} |",
        "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **chosen**" if r is best else ""
        v, t = r["validation"], r["test"]
        lines.append(f"| {r['graph']} | {r['setting']}{mark} | {r['int8_matmuls']} / {len(r['excluded'])} | "
                     f"{v['agreement']:.2f} / "
                     f"{v['agreement_in']:.2f} / {v['agreement_oos']:.2f} | {r['oos_pool']:.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in r['foreign'].values())} | {v['in_scope']:.2f} | {t['agreement']:.2f} "
                     f"/ {t['agreement_in']:.2f} / {t['agreement_oos']:.2f} | {t['in_scope']:.2f} | {t['accuracy']:.2f} "
                     f"| {r['test_qps']:,.0f} |")  # fmt: skip
    lines += ["", f"Chosen: **{best['setting']}** on the {best['graph']} graph "
              f"({'meets the validation rule' if good else f'none meets the validation rule; the fastest within {NEAR_BEST} point of the best lower agreement'}); test agreement {best['test']['agreement']:.2f}%, "
              f"in-scope drop {fp32['test']['in_scope'] - best['test']['in_scope']:.2f} point.", ""]  # fmt: skip
    for graph, ranked in sensitivity_tables.items():
        lines += [f"## Per-node sensitivity, {graph} graph (each node alone quantized, dynamic int8)", "",
                  "Disturbance: squared logit error over the fp32 logits' variance, on the calibration queries.", "",
                  "| rank | node | disturbance |", "|---:|---|---:|",
                  *[f"| {i + 1} | {n} | {d:.3g} |" for i, (n, d) in enumerate(ranked[:12])],
                  f"| | median of {len(ranked)} | {float(np.median([d for _, d in ranked])):.3g} |", ""]  # fmt: skip
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
