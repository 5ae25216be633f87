"""Hub push with huggingface_hub patched at its network boundary (HfApi.create_repo / create_commit), and against
an unreachable local Hub (a closed port, and a port that accepts but never answers)."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants

from querytune.cli import main
from querytune.hub import hub_model_id, push_run, upload_files
from querytune.runs import MARKER, read_run

from .conftest import tiny_experiment
from .test_tracking import closed_port

SECRET = "hf_SECRETtokenNEVERonDISK"


class FakeHub:
    """Records what would have been uploaded; optionally fails like a network error."""

    def __init__(self, fail: bool = False, run_dir: Path | None = None) -> None:
        self.fail = fail
        self.run_dir = run_dir  # to see whether the local marker existed when the commit was made
        self.repos: list[tuple[str, bool | None]] = []
        self.commits: list[tuple[str, dict[str, bytes]]] = []
        self.local_marker_at_commit: list[bool] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
            hub.repos.append((repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, commit_message=None, **kw):
            if hub.fail:
                raise ConnectionError("Hub unreachable")
            if hub.run_dir is not None:
                hub.local_marker_at_commit.append((hub.run_dir / MARKER).exists())
            files = {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                     else Path(op.path_or_fileobj).read_bytes() for op in operations}  # fmt: skip
            hub.commits.append((repo_id, files))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self


EXPECTED_FILES = {
    "README.md", "adapter_config.json", "config.json", "adapter_model.safetensors", "all_results.json", "label_map.json",
    MARKER, "querytune_config.yaml", "tokenizer.json", "tokenizer_config.json", "train_log.json",
    "test_report.json", "test_report.txt", "test_confusion.png", "test_confused_pairs.json",
    "validation_report.json", "validation_report.txt", "validation_confusion.png", "validation_confused_pairs.json",
}  # fmt: skip


def test_push_during_training_uploads_exactly_the_run(tmp_path, tiny_bert, tiny_data, monkeypatch, capsys):
    hub = FakeHub(run_dir=tmp_path / "run").install(monkeypatch)
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", push_to_hub=True,
                          hub_model_id="acme/query-intents", hub_token=SECRET, save_strategy="steps",
                          save_steps=1)  # fmt: skip
    assert main(["train", str(exp)]) == 0
    assert hub.repos == [("acme/query-intents", None)]
    ((repo, files),) = hub.commits
    assert repo == "acme/query-intents"
    assert set(files) == EXPECTED_FILES
    assert hub.local_marker_at_commit == [False], "the push comes before the marker"
    assert json.loads(files[MARKER])["status"] == "finished", "the pushed copy is a finished run"
    run = tmp_path / "run"
    assert read_run(run)["status"] == "finished"
    assert (run / "checkpoint-1").is_dir(), "checkpoints exist locally but are not uploaded"

    card = ModelCard.load(run / "README.md")
    assert card.data.library_name == "peft" and "querytune" in card.data.tags and "lora" in card.data.tags
    assert card.data.model_name == "query-intents"
    names = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert set(names) == {"Accuracy", "Macro F1"}
    assert 'snapshot_download("acme/query-intents")' in card.text
    assert 'AutoPeftModelForSequenceClassification.from_pretrained(\n    "acme/query-intents"' in card.text
    assert files["README.md"] == (run / "README.md").read_bytes()

    # the token is nowhere on disk (checkpoints and pickled training args included) nor in what was printed
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_failed_push_keeps_the_run_and_says_how_to_retry(tmp_path, tiny_bert, tiny_data, monkeypatch, capsys):
    FakeHub(fail=True).install(monkeypatch)
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="ia3", push_to_hub=True, hub_model_id="acme/x")
    assert main(["train", str(exp)]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "push of" in err and f"retry with: querytune push {run} --repo-id acme/x" in err
    assert (run / MARKER).is_file() and (run / "adapter_model.safetensors").is_file()
    info = read_run(run, "failed_after_training")
    assert [f["stage"] for f in info["failures"]] == ["hub_push"]

    hub = FakeHub().install(monkeypatch)  # the network is back: retry after the fact
    assert main(["push", str(run), "--repo-id", "acme/x", "--private"]) == 0
    assert hub.repos == [("acme/x", True)] and set(hub.commits[0][1]) == set(p.name for p in upload_files(run))
    assert read_run(run)["status"] == "finished", "the retried push was the only thing missing"
    assert json.loads(hub.commits[0][1][MARKER])["status"] == "finished"


def test_push_refuses_an_unfinished_run(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main(["push", str(tmp_path / "half"), "--repo-id", "acme/x"]) == 2
    assert "not a finished querytune run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "expected"),
    [("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"), ("bert-base-uncased", "bert-base-uncased"),
     ("/tmp/some/local/folder", None)],
)  # fmt: skip
def test_card_base_model_is_a_hub_id(name, expected):
    assert hub_model_id(name) == expected


def silent_port() -> tuple[socket.socket, int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, sock.getsockname()[1]


@pytest.fixture
def online_hub(monkeypatch):
    """huggingface_hub as it is online (the test session runs it offline), with a fake token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)

    def endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return endpoint


def test_push_to_an_unreachable_hub_fails_and_keeps_the_run(tmp_path, tiny_bert, tiny_data, online_hub, capsys):
    online_hub(f"http://127.0.0.1:{closed_port()}")
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", push_to_hub=True, hub_model_id="acme/x")
    assert main(["train", str(exp)]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "ConnectError" in err and f"retry with: querytune push {run} --repo-id acme/x" in err
    assert read_run(run, "failed_after_training")["failures"][0]["stage"] == "hub_push"
    assert (run / "adapter_model.safetensors").is_file()


def test_a_hub_that_never_answers_times_out(tmp_path, tiny_bert, tiny_data, online_hub, monkeypatch):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora")
    assert main(["train", str(exp)]) == 0
    sock, port = silent_port()
    online_hub(f"http://127.0.0.1:{port}")
    monkeypatch.setenv("QUERYTUNE_HUB_TIMEOUT", "1")
    outcome: dict = {}

    def push() -> None:
        try:
            push_run(tmp_path / "run", "acme/x")
        except Exception as err:  # noqa: BLE001
            outcome["error"] = err

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    thread.join(300)  # without a timeout the push would wait forever
    sock.close()
    assert not thread.is_alive(), "the push never gave up on a Hub that does not answer"
    assert re.search(r"push of .* failed \((Read|Connect|Write)Timeout", str(outcome.get("error")))
    assert read_run(tmp_path / "run")["status"] == "finished", "a failed retry changes nothing"
