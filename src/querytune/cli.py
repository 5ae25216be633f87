"""The `querytune` command: train, predict and eval.

querytune train EXPERIMENT.yaml [--key value ...]
querytune predict RUN_DIR "where is my package" "cheap running shoes size 10"
querytune predict RUN_DIR --file queries.txt      # or: cat queries.txt | querytune predict RUN_DIR
querytune predict RERANK_RUN "angle bracket" --candidates "Simpson 12-Gauge Angle" "Deck Coating"  # or --candidates_file
querytune predict RETRIEVAL_RUN "angle bracket" --top_k 10 [--catalogue titles.csv]
querytune eval RUN_DIR --dataset_name PATH_OR_HUB_ID [--split test] [--label_column intent]
querytune export RUN_DIR --format merged|onnx [--quantize int8]
querytune serve RUN_OR_EXPORT_DIR... [--host 127.0.0.1 --port 8000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from querytune.errors import ConfigError, RunError, run_guarded
from querytune.runs import write_json_atomic


def _read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.queries)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"query file not found: {path}")
        queries += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not queries and not sys.stdin.isatty():
        queries = [line.strip() for line in sys.stdin if line.strip()]
    if not queries:
        raise ValueError("no queries: pass them as arguments, with --file, or on stdin")
    return queries


def cmd_predict(args: argparse.Namespace) -> int:
    from querytune.inference import LoadedRun

    candidates = _read_candidates(args)
    queries = _read_queries(args)
    loaded = LoadedRun(args.run_dir, merge=not args.no_merge, allow_status=args.allow_status)
    given = {name: value for name, value in (("candidates", candidates), ("catalogue", args.catalogue)) if value}
    unused = [name for name in given if name not in loaded.task.request_inputs]
    if unused:
        flags = " / ".join(f"--{n}" + (" / --candidates_file" if n == "candidates" else "") for n in unused)
        raise ValueError(f"{flags}: not used by a {loaded.config.data.task} run")
    results = loaded.predict(queries, top_k=args.top_k, batch_size=args.batch_size, **given)
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _read_candidates(args: argparse.Namespace) -> list[str] | None:
    """Candidate documents for a rerank run: --candidates, and/or --candidates_file (one per line; '-' is stdin)."""
    candidates = list(args.candidates or [])
    if args.candidates_file == "-":
        candidates += [line.strip() for line in sys.stdin if line.strip()]
    elif args.candidates_file:
        path = Path(args.candidates_file)
        if not path.is_file():
            raise FileNotFoundError(f"candidates file not found: {path}")
        candidates += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return candidates or None


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """Re-score a saved run on any split of any dataset with the run's own label map."""
    import dataclasses

    from querytune.config import DataArguments, load_config
    from querytune.inference import LoadedRun
    from querytune.tasks import arguments_of

    loaded = LoadedRun(args.run_dir, merge=not args.no_merge, allow_status=args.allow_status)
    task_args = arguments_of(loaded.config.data.task)
    data_keys = {f.name for cls in (DataArguments, task_args) if cls for f in dataclasses.fields(cls)}
    for tok in overrides:
        key = tok[2:].split("=")[0] if tok.startswith("--") else None
        if key is not None and key not in data_keys:
            raise ConfigError(f"command line: querytune eval takes data keys only; {key!r} is not one")
    # Re-parse the run's resolved config with the data overrides, so every value is checked as in training.
    config = load_config(Path(args.run_dir) / "querytune_config.yaml", overrides)
    sources = ("dataset_name", "dataset_config_name", "train_file", "validation_file", "test_file")
    given = {tok[2:].split("=")[0] for tok in overrides if tok.startswith("--")}
    if given & set(sources):  # a new dataset: forget the training run's files
        for key in set(sources) - given:
            setattr(config.data, key, None)
    loaded.task.config = config
    name = Path(config.data.dataset_name or config.data.train_file or "data").name
    out_dir = Path(args.run_dir) / "evals" / f"{name}-{args.split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = loaded.task.evaluate(loaded, args.split, out_dir, batch_size=args.batch_size)
    result = {"dataset": config.data.dataset_name or config.data.train_file, "split": args.split, **metrics}
    write_json_atomic(out_dir / "metrics.json", result)
    print(json.dumps(result, indent=2))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from querytune.hub import PUSH_STATUSES, push_run

    allow = ",".join([*PUSH_STATUSES, args.allow_status])  # a failed push is what `querytune push` retries
    print(push_run(args.run_dir, args.repo_id, token=args.token, private=args.private or None, allow_status=allow))
    return 0


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from querytune.sweep import run_sweep

    summary = run_sweep(args.sweep_file, args.trials, args.output_dir, seed=args.seed, extra_args=overrides,
                        resume=args.resume)  # fmt: skip
    best = summary["best"]
    print(json.dumps({"best": best and {k: best[k] for k in ("trial", "value", "params", "run_dir")}}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Compare finished runs: a Markdown table and a PNG chart (unfinished directories are skipped, with a note)."""
    from querytune.report import machine_description, markdown_table, plot_runs, run_row

    rows = []
    for run_dir in args.runs:
        try:
            rows.append(run_row(run_dir, metric_prefix=args.split, allow_status=args.allow_status))
        except RunError as err:
            print(f"querytune: skipping {run_dir}: {err}", file=sys.stderr)
    if not rows:
        raise RunError("no finished runs to report")
    table = markdown_table(rows)
    text = f"# {args.title}\n\nMeasured on: {machine_description()}.\n\n{table}\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.png:
        plot_runs(rows, args.png, title=args.title)
    print(text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run (merged PyTorch, or ONNX fp32/int8), verified against the PyTorch run."""
    from querytune.serving.export import export_run

    info = export_run(args.run_dir, fmt=args.format, quantize=args.quantize, output_dir=args.output_dir,
                      overwrite=args.overwrite, verify_samples=args.verify_samples, verify_file=args.verify_file,
                      opset=args.opset, exporter=args.exporter, optimize=not args.no_optimize,
                      quantization=args.quantization, allow_status=args.allow_status)  # fmt: skip
    print(f"{info['merge_note']}; exported to {info['export_dir']}", file=sys.stderr)
    print(json.dumps({"export_dir": info["export_dir"], **info["verification"]}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve runs and exports over HTTP until SIGINT/SIGTERM."""
    from querytune.serving.api import ServeSettings, serve

    settings = ServeSettings(max_batch=args.max_batch, model_batch_size=args.model_batch_size,
                             max_wait_ms=args.max_wait_ms, max_queries_per_request=args.max_queries, max_query_chars=args.max_query_chars,
                             max_pending=args.max_pending)  # fmt: skip
    serve(args.runs, host=args.host, port=args.port, settings=settings, threads=args.threads,
          allow_status=args.allow_status)  # fmt: skip
    return 0


def _allow_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow_status",
        "--allow-status",
        default="finished",
        help="load a run that did not finish cleanly too: pruned (stopped by a sweep's pruner), "
        "failed_after_training (W&B or the Hub push failed after training), or any",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="querytune", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train an experiment (flags after the file override its keys)", add_help=False
    )
    train.add_argument("rest", nargs=argparse.REMAINDER)

    predict = sub.add_parser("predict", help="label queries with a finished run")
    predict.add_argument("run_dir")
    predict.add_argument("queries", nargs="*", help="queries (or use --file / stdin)")
    predict.add_argument("--file", help="a text file with one query per line")
    predict.add_argument(
        "--top_k",
        "--top-k",
        type=int,
        default=None,
        help="labels per query (default 3); rerank: candidates shown (default all); retrieval: hits (10)",
    )
    predict.add_argument("--batch_size", "--batch-size", type=int, default=64)
    predict.add_argument("--no_merge", "--no-merge", action="store_true", help="keep the adapter unmerged")
    predict.add_argument("--candidates", nargs="+", help="rerank: the documents to rank for the query")
    predict.add_argument("--candidates_file", "--candidates-file", help="rerank: one document per line ('-': stdin)")
    predict.add_argument("--catalogue", help="retrieval: a catalogue file to search (default: the run's dataset)")
    _allow_status(predict)

    ev = sub.add_parser("eval", help="re-score a finished run on a dataset split (data keys as flags)")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", help="the split to score (default test)")
    ev.add_argument("--batch_size", "--batch-size", type=int, default=64)
    ev.add_argument("--no_merge", "--no-merge", action="store_true")
    _allow_status(ev)
    sweep = sub.add_parser("sweep", help="run a W&B sweep file offline with Optuna (extra flags go to every trial)")
    sweep.add_argument("sweep_file")
    sweep.add_argument("--trials", type=int, default=8)
    sweep.add_argument("--sweep_dir", "--sweep-dir", dest="output_dir", default=None, help="default runs/sweep-<name>")
    sweep.add_argument("--sweep_seed", "--sweep-seed", dest="seed", type=int, default=0, help="sampler seed")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --sweep_dir")

    report = sub.add_parser("report", help="compare finished runs: Markdown table + PNG chart")
    report.add_argument("runs", nargs="+")
    report.add_argument("--out", help="write the Markdown table here")
    report.add_argument("--png", help="write the comparison chart here")
    report.add_argument("--split", default="test", choices=["test", "eval"], help="metrics of this split")
    report.add_argument("--title", default="querytune run comparison")
    _allow_status(report)

    push = sub.add_parser("push", help="upload a finished run (adapter, head, label map, card) to the Hub")
    push.add_argument("run_dir")
    push.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    _allow_status(push)

    export = sub.add_parser("export", help="export a run for serving (merged / ONNX, int8), verified against it")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["merged", "onnx"], default="merged")
    export.add_argument("--quantize", choices=["int8"], default=None, help="ONNX only: int8 (see --quantization)")
    export.add_argument("--output_dir", "--output-dir", default=None, help="default RUN_DIR/exports/FORMAT[-int8]")
    export.add_argument("--overwrite", action="store_true", help="replace a finished export")
    export.add_argument("--verify_samples", "--verify-samples", type=int, default=256)
    export.add_argument("--verify_file", "--verify-file", help="verify on these queries (one per line)")
    export.add_argument("--opset", type=int, default=18)
    export.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    export.add_argument("--no_optimize", "--no-optimize", action="store_true",
                        help="ONNX: skip ONNX Runtime's transformer fusions (kept only where they match the run)")  # fmt: skip
    export.add_argument("--quantization", default=None,
                        help="--quantize int8: the setting (see querytune.serving.export.QUANT_SETTINGS; default: the "
                        "one chosen on CLINC150)")  # fmt: skip
    _allow_status(export)

    srv = sub.add_parser("serve", help="HTTP JSON API over runs and exports (POST /predict, /metrics)")
    srv.add_argument("runs", nargs="+", help="run or export directories, optionally NAME=DIR")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max_batch", "--max-batch", type=int, default=64, help="queries collected per batch")
    srv.add_argument("--model_batch_size", "--model-batch-size", type=int, default=16,
                     help="queries per model call: a collected batch is scored in length-sorted model batches")  # fmt: skip
    srv.add_argument("--max_wait_ms", "--max-wait-ms", type=float, default=5.0, help="micro-batching window")
    srv.add_argument("--max_queries", "--max-queries", type=int, default=64, help="queries per request")
    srv.add_argument("--max_query_chars", "--max-query-chars", type=int, default=512)
    srv.add_argument("--max_pending", "--max-pending", type=int, default=256, help="beyond this: 503")
    srv.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads per model")
    _allow_status(srv)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    if argv and argv[0] == "train":
        rest = argv[1:]
        if not rest or rest[0] in ("-h", "--help"):
            from querytune.config import _RaisingParser, sections

            print("usage: querytune train EXPERIMENT.yaml [--key value ...]\n")
            _RaisingParser(sections()).print_help()
            return 0 if rest else 2
        from querytune.train import main as train_main

        return run_guarded(train_main, rest)
    args, overrides = parser.parse_known_args(argv)
    if args.command in ("predict", "push", "report", "export", "serve"):
        if overrides:
            parser.error(f"unknown arguments: {' '.join(overrides)}")
        commands = {"predict": cmd_predict, "push": cmd_push, "report": cmd_report, "export": cmd_export,
                    "serve": cmd_serve}  # fmt: skip
        return run_guarded(commands[args.command], args)
    if args.command == "sweep":
        return run_guarded(cmd_sweep, args, overrides)
    return run_guarded(cmd_eval, args, overrides)


if __name__ == "__main__":
    sys.exit(main())
