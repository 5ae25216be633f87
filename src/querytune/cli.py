"""The `querytune` command: train, predict and eval.

querytune train EXPERIMENT.yaml [--key value ...]    # or: querytune train --config EXPERIMENT.yaml ...
querytune predict RUN_DIR "where is my package" "cheap running shoes size 10"
querytune predict RUN_DIR --file queries.txt      # or: cat queries.txt | querytune predict RUN_DIR
querytune predict RERANK_RUN "angle bracket" --candidates "Simpson 12-Gauge Angle" "Deck Coating"  # or --candidates_file
querytune predict RETRIEVAL_RUN "angle bracket" --top_k 10 [--catalogue titles.csv]
querytune eval RUN_DIR --dataset_name PATH_OR_HUB_ID [--split test] [--label_column intent]
querytune export RUN_DIR --format merged|onnx|openvino [--quantize int8]
querytune serve RUN_OR_EXPORT_DIR... [--host 127.0.0.1 --port 8000]
querytune sweep SWEEP.yaml --trials 8 | report RUN... | push RUN_DIR --repo-id ORG/NAME

`querytune COMMAND --help` lists each command's options; `querytune train --help` lists every experiment key.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from querytune.errors import ConfigError, RunError, run_guarded
from querytune.tasks import declared_inputs
from querytune.validation import query_problem

logger = logging.getLogger("querytune")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever is printed to stdout (by querytune or a library, from Python or C) to stderr for the block.

    `predict`, `eval` and `export` print their results to stdout after the block, so that stdout holds only those
    results whatever the environment: with WANDB_MODE=offline, transformers prints "[INFO] Running in WANDB
    offline mode" to stdout when it is imported, which broke `querytune predict ... | jq`.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding interpreter): redirect Python's stdout only
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a batch size, a count), so 0 or -1 is a clear usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _read_queries(args: argparse.Namespace) -> list[str]:
    """Queries from the arguments, else stdin (blank lines skipped); each is checked as the server checks it: an
    empty, whitespace-only or unprintable query is an error naming it. (`--file` is streamed: `_predict_file`.)"""
    queries = [(f"query {i + 1}", q) for i, q in enumerate(args.queries)]
    if not queries and not sys.stdin.isatty():
        queries = [(f"stdin line {n}", line.strip()) for n, line in enumerate(sys.stdin, 1) if line.strip()]
    if not queries:
        raise ValueError("no queries: pass them as arguments, with --file, or on stdin")
    for where, text in queries:
        problem = query_problem(text)
        if problem:
            raise ValueError(f"{where} {problem}: every query needs a printable character")
    return [text for _, text in queries]


def cmd_predict(args: argparse.Namespace) -> int:
    given = _read_inputs(args)
    if args.file:
        return _predict_file(args, given)
    if args.output:
        raise ValueError("--output goes with --file (a log scored in chunks)")
    queries = _read_queries(args)
    with stdout_to_stderr():
        from querytune.inference import LoadedRun

        loaded = LoadedRun(args.run_dir, merge=not args.no_merge, trust_remote_code=args.trust_remote_code,
                           allow_status=args.allow_status)  # fmt: skip
        takes = {spec.name for spec in loaded.task.request_inputs}
        unused = [name for name in given if name not in takes]
        if unused:
            flags = " / ".join(" / ".join(_input_flags(declared_inputs()[n][0])) for n in unused)
            raise ValueError(f"{flags}: not used by a {loaded.config.data.task} run")
        truncated = loaded.count_truncated(queries)
        if truncated:
            logger.warning("%d of %d queries are longer than max_seq_length (%d tokens): their end is cut before "
                           "scoring", truncated, len(queries), loaded.config.model.max_seq_length)  # fmt: skip
        results = loaded.predict(queries, top_k=args.top_k, batch_size=args.batch_size, **given)
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _predict_file(args: argparse.Namespace, given: dict[str, Any]) -> int:
    """A query log of any size, streamed chunk by chunk (querytune.scoring): to --output, resuming after what it
    holds, or to stdout."""
    from querytune.scoring import score_file

    try:  # results go to the real stdout, while the libraries' noise goes to stderr below
        stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    except (OSError, AttributeError, io.UnsupportedOperation):  # stdout is a Python object only (captured, embedded)
        stdout = _Unclosed(sys.stdout)
    try:
        with stdout_to_stderr():
            from querytune.inference import LoadedRun

            loaded = LoadedRun(args.run_dir, merge=not args.no_merge, trust_remote_code=args.trust_remote_code,
                               allow_status=args.allow_status)  # fmt: skip
            head = _read_queries(args) if args.queries else []  # queries given as arguments come first
            counts = score_file(loaded, args.file, args.output, args.chunk_size, args.column, args.top_k,
                                args.batch_size, stream=stdout, head=head, **given)  # fmt: skip
            if args.output:
                logger.warning("%s: %d queries scored, %d already there from an earlier run", args.output,
                               counts["scored"], counts["skipped"])  # fmt: skip
    finally:
        stdout.close()
    return 0


class _Unclosed(io.TextIOBase):
    """`stream` for writing, left open when closed (sys.stdout when it has no file descriptor)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


def _input_flags(spec) -> list[str]:
    """The `querytune predict` flags of a task input: --NAME, and --NAME_file for a list of texts."""
    return [f"--{spec.name}", f"--{spec.name}_file"] if spec.kind == "texts" else [f"--{spec.name}"]


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per input that some task's predict takes besides the queries, from the tasks' declarations."""
    for name, (spec, tasks) in declared_inputs().items():
        if spec.kind == "texts":
            parser.add_argument(f"--{name}", nargs="+", help=spec.help)
            parser.add_argument(f"--{name}_file", f"--{name}-file",
                                help=f"{', '.join(tasks)}: one {spec.item} per line ('-': stdin)")  # fmt: skip
        else:
            parser.add_argument(f"--{name}", help=spec.help)


def _read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The task inputs given on the command line: a list of texts from --NAME and/or --NAME_file (one per line;
    '-' is stdin), each checked as a query is; a path as given."""
    given: dict[str, Any] = {}
    for name, (spec, _) in declared_inputs().items():
        if spec.kind != "texts":
            if getattr(args, name, None):
                given[name] = getattr(args, name)
            continue
        texts = list(getattr(args, name, None) or [])
        source = getattr(args, f"{name}_file", None)
        if source == "-":
            texts += [line.strip() for line in sys.stdin if line.strip()]
        elif source:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{name} file not found: {path}")
            texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for i, text in enumerate(texts):
            problem = query_problem(text)
            if problem:
                raise ValueError(f"{spec.item} {i + 1} {problem}")
        if texts:
            given[name] = texts
    return given


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """Re-score a saved run on any split of any dataset with the run's own label map."""
    with stdout_to_stderr():
        result = _evaluate(args, overrides)
    print(json.dumps(result, indent=2))
    return 0


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> dict:
    import dataclasses

    from querytune.config import DataArguments, check_split_name, load_config
    from querytune.inference import LoadedRun
    from querytune.runs import write_json_atomic
    from querytune.tasks import sections_of

    try:  # the split names a folder under the run directory: a plain name only (`--split ../x` is refused)
        check_split_name(args.split, "--split")
    except ValueError as err:
        raise ConfigError(f"command line: {err}") from None
    loaded = LoadedRun(args.run_dir, merge=not args.no_merge, trust_remote_code=args.trust_remote_code,
                       allow_status=args.allow_status)  # fmt: skip
    sections = (DataArguments, *sections_of(loaded.config.data.task))
    data_keys = {f.name for cls in sections for f in dataclasses.fields(cls)}
    for tok in overrides:
        key = tok[2:].split("=")[0] if tok.startswith("--") else None
        if key is not None and key not in data_keys:
            raise ConfigError(f"command line: querytune eval takes data keys only; {key!r} is not one")
    # Re-parse the run's resolved config with the data overrides, so every value is checked as in training.
    config = load_config(Path(args.run_dir) / "querytune_config.yaml", overrides)
    config.model.trust_remote_code = loaded.trust_remote_code  # never the saved value (see LoadedRun)
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
    return result


def cmd_push(args: argparse.Namespace) -> int:
    from querytune.hub import PUSH_STATUSES, push_run

    allow = ",".join([*PUSH_STATUSES, args.allow_status])  # a failed push is what `querytune push` retries
    print(push_run(args.run_dir, args.repo_id, token=args.token, private=args.private or None, allow_status=allow))
    return 0


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from querytune.sweep import run_sweep

    summary = run_sweep(args.sweep_file, args.trials, args.output_dir, seed=args.seed, extra_args=overrides,
                        resume=args.resume, storage=args.storage, heartbeat_s=args.heartbeat_s)  # fmt: skip
    best = summary["best"]
    print(json.dumps({"best": best and {k: best[k] for k in ("trial", "value", "params", "run_dir")}}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Compare finished runs: a Markdown table and a PNG chart (unfinished directories are skipped, with a note)."""
    from querytune.report import machine_description, markdown_table, plot_runs, run_labels, run_row

    rows = []
    labels = run_labels(args.runs)
    for run_dir in args.runs:
        try:
            rows.append(run_row(run_dir, metric_prefix=args.split, label=labels[str(run_dir)],
                                allow_status=args.allow_status))  # fmt: skip
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
    with stdout_to_stderr():
        from querytune.serving.export import export_run

        info = export_run(args.run_dir, fmt=args.format, quantize=args.quantize, output_dir=args.output_dir,
                          overwrite=args.overwrite, verify_samples=args.verify_samples, verify_file=args.verify_file,
                          opset=args.opset, exporter=args.exporter, optimize=not args.no_optimize,
                          quantization=args.quantization, allow_status=args.allow_status,
                          trust_remote_code=args.trust_remote_code)  # fmt: skip
    print(f"{info['merge_note']}; exported to {info['export_dir']}", file=sys.stderr)
    print(json.dumps({"export_dir": info["export_dir"], **info["verification"]}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve runs and exports over HTTP until SIGINT/SIGTERM."""
    from querytune.extras import require_extra

    require_extra("serve", "querytune serve")  # serving.api imports them at module level
    from querytune.serving.api import ServeSettings, serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key.strip():
            raise ConfigError(f"--api_key_env {args.api_key_env}: the environment variable is unset or empty")
    settings = ServeSettings(max_batch=args.max_batch, model_batch_size=args.model_batch_size,
                             max_wait_ms=args.max_wait_ms,
                             max_queries_per_request=args.max_queries, max_query_chars=args.max_query_chars,
                             max_pending=args.max_pending, max_body_bytes=args.max_body_bytes,
                             timeout_s=args.timeout_s, api_key=api_key)  # fmt: skip
    serve(args.runs, host=args.host, port=args.port, settings=settings, threads=args.threads,
          trust_remote_code=args.trust_remote_code, allow_status=args.allow_status, workers=args.workers)  # fmt: skip
    return 0


TRUST_HELP = ("run the base model's custom code from the Hub; a run's saved trust_remote_code: true is ignored "
              "without this flag")  # fmt: skip


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # `train` parses its own flags (every experiment key); main() hands it the rest of the command line.
    train = sub.add_parser(
        "train", help="train an experiment (flags after the file override its keys; --help lists them)", add_help=False
    )
    train.add_argument("rest", nargs=argparse.REMAINDER)
    launch = sub.add_parser("launch", help="accelerate launch over several machines: a bounded wait for every machine "
                            "(--join_timeout_s) and one-line errors (--help lists accelerate's flags)", add_help=False)  # fmt: skip
    launch.add_argument("rest", nargs=argparse.REMAINDER)

    predict = sub.add_parser("predict", help="label queries with a finished run (one JSON line per query)")
    predict.add_argument("run_dir")
    predict.add_argument("queries", nargs="*", help="queries (or use --file / stdin)")
    predict.add_argument("--file", help="a query log: text (one query per line), JSON lines or parquet; scored in "
                         "chunks, so of any size")  # fmt: skip
    predict.add_argument("--output", "-o", help="with --file: JSON lines (.jsonl) or a parquet folder (.parquet); a "
                         "killed job resumes after what it holds")  # fmt: skip
    predict.add_argument("--column", default="query", help="with --file: the field of JSON lines / parquet rows")
    predict.add_argument("--chunk_size", "--chunk-size", type=positive_int, default=10_000,
                         help="with --file: queries read, scored and written at a time")  # fmt: skip
    predict.add_argument(
        "--top_k",
        "--top-k",
        type=positive_int,
        default=None,
        help="labels per query (default 3); rerank: candidates shown (default all); retrieval: hits (10)",
    )
    predict.add_argument("--batch_size", "--batch-size", type=positive_int, default=64, help="queries per model call")
    predict.add_argument("--no_merge", "--no-merge", action="store_true", help="keep the adapter unmerged")
    _add_input_flags(predict)
    _allow_status(predict)
    predict.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)

    ev = sub.add_parser("eval", help="re-score a finished run on a dataset split (data keys as flags)")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", help="the split to score (default test; a plain split name)")
    ev.add_argument("--batch_size", "--batch-size", type=positive_int, default=64, help="queries per model call")
    ev.add_argument("--no_merge", "--no-merge", action="store_true", help="keep the adapter unmerged")
    _allow_status(ev)
    ev.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)
    ev.epilog = ("Data keys of the experiment (e.g. --dataset_name, --label_column, --unseen_labels as_wrong) "
                 "override the run's saved config.")  # fmt: skip

    sweep = sub.add_parser("sweep", help="run a W&B sweep file offline with Optuna (extra flags go to every trial)")
    sweep.add_argument("sweep_file")
    sweep.add_argument("--trials", type=positive_int, default=8)
    sweep.add_argument("--sweep_dir", "--sweep-dir", dest="output_dir", default=None, help="default runs/sweep-<name>")
    sweep.add_argument("--sweep_seed", "--sweep-seed", dest="seed", type=int, default=0, help="sampler seed")
    sweep.add_argument("--storage", default=None,
                       help="an Optuna RDB URL shared by several workers (postgresql://user:password@host/db); "
                       "default: optuna.db (SQLite) in the sweep directory, one process")  # fmt: skip
    sweep.add_argument("--heartbeat_s", "--heartbeat-s", type=float, default=60.0,
                       help="with --storage: a worker's trial is failed and run again by another worker after two "
                       "missed heartbeats of this many seconds")  # fmt: skip
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

    export = sub.add_parser("export", help="export a run for serving (merged / ONNX, int8 / OpenVINO), verified")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["merged", "onnx", "openvino"], default="merged",
                        help="openvino: fp32 OpenVINO IR of the plain ONNX graph (the openvino extra)")  # fmt: skip
    export.add_argument("--quantize", choices=["int8"], default=None, help="ONNX only: int8 (see --quantization)")
    export.add_argument("--output_dir", "--output-dir", default=None, help="default RUN_DIR/exports/FORMAT[-int8]")
    export.add_argument("--overwrite", action="store_true", help="replace a finished export")
    export.add_argument("--verify_samples", "--verify-samples", type=positive_int, default=256)
    export.add_argument("--verify_file", "--verify-file", help="verify on these queries (one per line)")
    export.add_argument("--opset", type=positive_int, default=18)
    export.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    export.add_argument("--no_optimize", "--no-optimize", action="store_true",
                        help="ONNX: skip ONNX Runtime's transformer fusions (kept only where they match the run)")  # fmt: skip
    export.add_argument("--quantization", default=None,
                        help="--quantize int8: the setting (see querytune.serving.quantize.QUANT_SETTINGS; default: the "
                        "one chosen on CLINC150)")  # fmt: skip
    _allow_status(export)
    export.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)

    srv = sub.add_parser("serve", help="HTTP JSON API over runs and exports (POST /predict, /metrics)")
    srv.add_argument("runs", nargs="+", help="run or export directories, optionally NAME=DIR")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max_batch", "--max-batch", type=positive_int, default=64, help="queries collected per batch")
    srv.add_argument("--model_batch_size", "--model-batch-size", type=positive_int, default=16,
                     help="queries per model call: a collected batch is scored in length-sorted model batches")  # fmt: skip
    srv.add_argument("--max_wait_ms", "--max-wait-ms", type=float, default=5.0, help="micro-batching window")
    srv.add_argument("--max_queries", "--max-queries", type=positive_int, default=64, help="queries per request")
    srv.add_argument("--max_query_chars", "--max-query-chars", type=positive_int, default=512)
    srv.add_argument("--max_pending", "--max-pending", type=positive_int, default=256, help="beyond this: 503")
    srv.add_argument("--max_body_bytes", "--max-body-bytes", type=positive_int, default=1 << 20,
                     help="largest request body (default 1 MiB); beyond it: 413, before the body is read")  # fmt: skip
    srv.add_argument("--timeout_s", "--timeout-s", type=positive_float, default=30.0,
                     help="a request not answered within this many seconds gets 504 (default 30)")  # fmt: skip
    srv.add_argument("--api_key_env", "--api-key-env", metavar="NAME", default=None,
                     help="require this environment variable's value as 'Authorization: Bearer KEY' or 'X-API-Key: "
                     "KEY' on every endpoint but /health (401 without it)")  # fmt: skip
    srv.add_argument("--threads", type=positive_int, default=None,
                     help="torch / ONNX Runtime threads per model (default: all cores, divided among --workers)")  # fmt: skip
    srv.add_argument("--workers", type=positive_int, default=1,
                     help="worker processes on one port, each with its own copy of every run and its own batcher; "
                     "limits such as --max_pending hold per worker, /metrics sums them (default 1)")  # fmt: skip
    srv.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_HELP)
    _allow_status(srv)
    return parser


def train_help() -> int:
    """`querytune train --help`: every experiment key with its help (costs the import of TrainingArguments)."""
    from querytune.config import RaisingParser, sections

    print("usage: querytune train EXPERIMENT.yaml [--key value ...]\n"
          "       querytune train --config EXPERIMENT.yaml [--key value ...]\n"
          "       accelerate launch [accelerate options] -m querytune.train EXPERIMENT.yaml [--key value ...]\n\n"
          "Every key of an experiment file is also a flag; flags override the file, `--key null` sets None.\n"
          "`--method X` drops the file's options for another method (with a notice).\n")  # fmt: skip
    RaisingParser(sections(), prog="querytune train", usage=argparse.SUPPRESS).print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    if argv and argv[0] == "train":
        rest = argv[1:]
        if not rest or "-h" in rest or "--help" in rest:
            if not rest:
                print("querytune train: give an experiment file (querytune train --help lists every key)",
                      file=sys.stderr)  # fmt: skip
                return 2
            return train_help()
        from querytune.train import main as train_main

        return run_guarded(train_main, rest)
    if argv and argv[0] == "launch":
        from querytune.launch import main as launch_main

        return run_guarded(launch_main, argv[1:])
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
