"""Which int8 setting agrees with the fp32 run: every setting of `querytune.serving.export.QUANT_SETTINGS`, on the
fused and on the plain ONNX graph of a CLINC150 intent run, scored against the PyTorch run.

    python benchmarks/quantization.py --run runs/clinc150-full                       # every setting, both graphs
    python benchmarks/quantization.py --run RUN --settings dynamic-matmul-pc --graphs fused --max_queries 200

For each setting: the graph is quantized exactly as `querytune export --quantize int8 --quantization NAME` does it
(calibration, smoothing and the sensitivity pass on 512 training queries), then top-1 agreement with the PyTorch
run and in-scope / overall accuracy are measured on the validation split (where the setting is chosen) and on the test
split (reported, never used to choose). The rule: among the settings with validation agreement >= 99% on in-scope and
on out-of-scope queries each and an in-scope accuracy drop <= 0.5 point, the one leaving the fewest nodes in fp32; if
none qualifies, the most agreeing. A per-node sensitivity table shows which quantized nodes move the logits most.

Agreement and accuracy do not depend on the machine's load (the script may run at nice 19 beside other work). The
queries/s column does: it is printed for orientation and marked NOT FINAL unless the machine was quiet (1-minute
load average <= 1.5 before and after); the final speeds come from benchmarks/inference.py on a quiet machine.
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

TARGET_AGREEMENT, TARGET_DROP = 99.0, 0.5


def read_split(data: Path, split: str, max_queries: int | None) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    rows = rows[:max_queries] if max_queries else rows
    return [r["text"] for r in rows], [r["intent"] for r in rows]


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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/quantization.md"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from querytune.inference import LoadedRun
    from querytune.serving import export as ex

    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    names = args.settings or list(ex.QUANT_SETTINGS)
    settings = [ex.quant_setting(n) for n in names]
    run = Path(args.run)
    reference = LoadedRun(run, merge=False, device="cpu")
    labels = reference.task.labels
    splits = {s: read_split(Path(args.data), s, args.max_queries) for s in ("validation", "test")}
    print("PyTorch reference logits ...", flush=True)
    ref = {s: reference.logits(texts, batch_size=64) for s, (texts, _) in splits.items()}
    fp32 = {s: scores(ref[s], ref[s], splits[s][1], labels) for s in splits}

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
            ctexts, cpairs = ex.training_sample(reference, 512)
            calibration_size = len(ctexts)
            feeds = ex.calibration_feeds(reference, ctexts, cpairs, info["inputs"])
            one_shape = ex.calibration_feeds(reference, ctexts, cpairs, info["inputs"], one_shape=True)
            cache: dict = {}
            ranked = cache[(str(src), ("MatMul",), True)] = ex.sensitivity(src, feeds, ("MatMul",), work, True)
            sensitivity_tables[graph] = ranked
            tried = settings if graph != "plain" or args.plain_settings is None else [
                ex.quant_setting(n) for n in args.plain_settings]  # fmt: skip
            # a setting names the fused graph it is for; the plain graph takes the packed ones (no attention fused)
            tried = [s for s in tried if s.attention == (attention if graph != "plain" else "packed")]
            candidates = [(None, "fp32")] + [(s, s.name) for s in tried]
            for setting, name in candidates:
                dst = work / f"{graph}-{name}.onnx"
                t0 = time.perf_counter()
                record = {"excluded_nodes": []}
                if setting is not None:  # histogram calibration needs one shape, as export's finish_graph does it
                    histogram = setting.static and setting.calibrate_method != "MinMax"
                    record = ex.quantize_graph(src, dst, setting, one_shape if histogram else feeds, work, cache)
                quant_s = time.perf_counter() - t0
                graph_path = dst if setting else src
                row = {"graph": graph, "setting": name, "quantize_s": quant_s,
                       "excluded": record["excluded_nodes"]}  # fmt: skip
                for split, (texts, gold) in splits.items():
                    t0 = time.perf_counter()
                    logits = ex.graph_outputs(fp32_loaded, graph_path, texts, None)["logits"]
                    row[f"{split}_qps"] = len(texts) / (time.perf_counter() - t0)
                    row[split] = scores(logits, ref[split], gold, labels)
                rows.append(row)
                v = row["validation"]
                t = row["test"]
                print(f"  {graph} {name}: validation agreement {v['agreement']:.2f}% (in {v['agreement_in']:.2f}, "
                      f"OOS {v['agreement_oos']:.2f}), in-scope acc {v['in_scope']:.2f} (fp32 "
                      f"{fp32['validation']['in_scope']:.2f}); test agreement {t['agreement']:.2f}% (in "
                      f"{t['agreement_in']:.2f}, OOS {t['agreement_oos']:.2f}); {row['test_qps']:.0f} q/s (not final)",
                      flush=True)  # fmt: skip

    def qualifies(row: dict) -> bool:
        v = row["validation"]
        drop = fp32["validation"]["in_scope"] - v["in_scope"]
        return min(v["agreement_in"], v["agreement_oos"]) >= TARGET_AGREEMENT and drop <= TARGET_DROP

    int8 = [r for r in rows if r["setting"] != "fp32"]
    good = [r for r in int8 if qualifies(r)]
    # Fewest nodes left fp32 first: a speed order that does not depend on the machine's load.
    best = (min(good, key=lambda r: (len(r["excluded"]), -r["validation"]["agreement"])) if good
            else max(int8, key=lambda r: r["validation"]["agreement"]))  # fmt: skip
    load_after = load_average()
    quiet = load_before <= 1.5 and load_after <= 1.5
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
        "The setting is chosen on validation: agreement >= 99% on in-scope and on OOS queries each, in-scope "
        "accuracy drop <= 0.5 point, then the fewest nodes left fp32 (the speed order, whatever the load). Test is "
        "reported, never used to choose. Calibration, smoothing and the sensitivity pass use "
        f"{calibration_size} training queries.",
        "",
        *[f"- {g} graph: {note}" for g, note in graph_notes.items()],
        "",
        f"| graph | setting | nodes left fp32 | val agreement % (all / in / OOS) | val in-scope acc % | "
        f"test agreement % (all / in / OOS) | test in-scope acc % | test acc % | queries/s{speed_note} |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **chosen**" if r is best else ""
        v, t = r["validation"], r["test"]
        lines.append(f"| {r['graph']} | {r['setting']}{mark} | {len(r['excluded'])} | {v['agreement']:.2f} / "
                     f"{v['agreement_in']:.2f} / {v['agreement_oos']:.2f} | {v['in_scope']:.2f} | {t['agreement']:.2f} "
                     f"/ {t['agreement_in']:.2f} / {t['agreement_oos']:.2f} | {t['in_scope']:.2f} | {t['accuracy']:.2f} "
                     f"| {r['test_qps']:,.0f} |")  # fmt: skip
    lines += ["", f"Chosen: **{best['setting']}** on the {best['graph']} graph "
              f"({'meets' if good else 'misses'} the validation rule); test agreement {best['test']['agreement']:.2f}%, "
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
