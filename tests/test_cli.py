"""The `querytune` command end to end on a tiny model: train, predict, eval, resume, and the error paths."""

from __future__ import annotations

import io
import json
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
    assert result["split"] == "validation" and result["num_examples"] == 16 and 0 <= result["accuracy"] <= 1
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
