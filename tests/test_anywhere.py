"""A run trained with relative paths (`--dataset_name data/x`, `--model_name_or_path models/bert`) loads from any
working directory: `predict`, `eval`, `export` and `serve` of every run kind, run from another folder. A retrieval
run carries the catalogue it searches, so a copy whose training data is gone (a teammate's machine) still searches.

Regression: the saved config kept paths relative to the training directory, so a retrieval run trained with
`--dataset_name ../shared/data/homedepot` failed from any other directory ("could not load dataset").
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import COLUMNS, ranking_rows, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "WANDB_MODE": "disabled"}  # fmt: skip
QUERYTUNE = [sys.executable, "-m", "querytune"]
COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
          "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--max_seq_length", "32"]  # fmt: skip
RANKING = [f"--{k}={v}" for k, v in COLUMNS.items()] + ["--validation_split_percentage", "25",
                                                        "--ranking_test_percentage", "25", "--retrieval_top_k", "10"]  # fmt: skip
KINDS = {  # run kind: (data folder, flags, a query for predict)
    "intent": ("intent", ["--task", "intent", "--label_column", "intent", "--method", "lora"], "where is my order 5"),
    "slots": ("slots", ["--task", "slots", "--label_column", "intent"], "cheap wool socks for kids"),
    "intent_slots": ("slots", ["--task", "intent_slots", "--label_column", "intent"], "track my boots order"),
    "rerank": ("ranking", ["--task", "rerank", *RANKING], "red shoes"),
    "retrieval": ("ranking", ["--task", "retrieval", "--retrieval_mode", "hybrid", *RANKING], "red shoes"),
}


def _qt(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*QUERYTUNE, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"querytune {' '.join(args)} (in {cwd}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data, slot_data, slot_bert, ranking_bert) -> Path:
    """A project folder as a user has it: data and model under it, runs trained from it with relative paths."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_data, root / "data" / "intent")
    shutil.copytree(slot_data, root / "data" / "slots")
    write_jsonl(root / "data" / "ranking" / "train.jsonl", ranking_rows(40, 0))
    shutil.copytree(slot_bert, root / "models" / "bert")
    shutil.copytree(ranking_bert, root / "models" / "ranking")
    for kind, (data, flags, _) in KINDS.items():
        model = "models/ranking" if data == "ranking" else "models/bert"
        _qt(["train", "--dataset_name", f"data/{data}", "--model_name_or_path", model, "--output_dir",
             f"runs/{kind}", "--catalogue_cache_dir", "cache", *COMMON, *flags], cwd=root)  # fmt: skip
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_run_kind_predicts_evaluates_and_exports_from_another_folder(project, tmp_path, kind):
    run = project / "runs" / kind
    saved = yaml.safe_load((run / "querytune_config.yaml").read_text())
    assert Path(saved["dataset_name"]).is_absolute() and Path(saved["model_name_or_path"]).is_absolute()
    assert '# as written: "data/' in (run / "querytune_config.yaml").read_text(), "what the user wrote is kept"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    query = KINDS[kind][2]
    # a cross-encoder ranks the candidates it is given (never stdin here: the test's stdin is whatever runs pytest)
    given = ["--candidates", "red shoes set", "blue boots pack"] if kind == "rerank" else []
    out = _qt(["predict", str(run), query, *given], cwd=elsewhere).stdout
    assert json.loads(out.splitlines()[0])["query"] == query
    scores = json.loads(_qt(["eval", str(run), "--split", "test"], cwd=elsewhere).stdout)
    assert scores, "eval scored the test split"
    _qt(["export", str(run), "--output_dir", str(elsewhere / "export")], cwd=elsewhere)
    assert (elsewhere / "export" / "querytune_export.json").is_file()
    assert json.loads(_qt(["predict", str(elsewhere / "export"), query, *given], cwd=tmp_path).stdout.splitlines()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_run_kind_serves_from_another_folder(project, tmp_path):
    port = _free_port()
    runs = [f"{kind}={project / 'runs' / kind}" for kind in KINDS]
    proc = subprocess.Popen([*QUERYTUNE, "serve", *runs, "--port", str(port)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        body = json.dumps({"queries": ["red shoes"], "runs": ["intent", "slots", "intent_slots"]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert set(answer["results"][0]["predictions"]) == {"intent", "slots", "intent_slots"}
        body = json.dumps({"query": "red shoes", "run": "retrieval", "top_k": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/search", body, {"Content-Type": "application/json"})
        hits = json.loads(urllib.request.urlopen(request, timeout=60).read())["hits"]
        assert len(hits) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_retrieval_run_whose_training_data_is_gone_still_searches(project, tmp_path):
    """A copy of the run (what a push uploads) on a machine without the training data: it searches the catalogue it
    carries, and its card says so."""
    from querytune.hub import upload_files

    run = project / "runs" / "retrieval"
    copy = tmp_path / "teammate" / "retrieval"
    copy.mkdir(parents=True)
    for path in upload_files(run):
        shutil.copy2(path, copy / path.name)
    config = (copy / "querytune_config.yaml").read_text().replace(str(project / "data"), "/nowhere/data")
    (copy / "querytune_config.yaml").write_text(config)
    assert "catalogue.jsonl" in {p.name for p in upload_files(run)}
    assert "## Catalogue" in (run / "README.md").read_text()
    out = _qt(["predict", str(copy), "red shoes", "--top_k", "3"], cwd=tmp_path).stdout
    hits = json.loads(out.splitlines()[0])["ranked"]
    carried = {json.loads(line)["id"] for line in (copy / "catalogue.jsonl").read_text().splitlines()}
    assert len(hits) == 3 and all(h["doc_id"] in carried for h in hits)
