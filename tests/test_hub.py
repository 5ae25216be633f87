"""Hub push with huggingface_hub patched at its network boundary (HfApi.create_repo / create_commit)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from querytune.cli import main
from querytune.hub import hub_model_id, upload_files
from querytune.runs import MARKER

from .conftest import tiny_experiment

SECRET = "hf_SECRETtokenNEVERonDISK"


class FakeHub:
    """Records what would have been uploaded; optionally fails like a network error."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.repos: list[tuple[str, bool | None]] = []
        self.commits: list[tuple[str, dict[str, bytes]]] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
            hub.repos.append((repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, commit_message=None, **kw):
            if hub.fail:
                raise ConnectionError("Hub unreachable")
            hub.commits.append(
                (repo_id, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self


EXPECTED_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "all_results.json", "label_map.json",
    MARKER, "querytune_config.yaml", "tokenizer.json", "tokenizer_config.json", "train_log.json",
    "test_report.json", "test_report.txt", "test_confusion.png", "test_confused_pairs.json",
    "validation_report.json", "validation_report.txt", "validation_confusion.png", "validation_confused_pairs.json",
}  # fmt: skip


def test_push_during_training_uploads_exactly_the_run(tmp_path, tiny_bert, tiny_data, monkeypatch, capsys):
    hub = FakeHub().install(monkeypatch)
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="lora", push_to_hub=True,
                          hub_model_id="acme/query-intents", hub_token=SECRET, save_strategy="steps",
                          save_steps=1)  # fmt: skip
    assert main(["train", str(exp)]) == 0
    assert hub.repos == [("acme/query-intents", None)]
    ((repo, files),) = hub.commits
    assert repo == "acme/query-intents"
    assert set(files) == EXPECTED_FILES
    run = tmp_path / "run"
    assert (run / "checkpoint-1").is_dir(), "checkpoints exist locally but are not uploaded"

    card = ModelCard.load(run / "README.md")
    assert card.data.library_name == "peft" and "querytune" in card.data.tags and "lora" in card.data.tags
    assert card.data.model_name == "query-intents"
    names = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert set(names) == {"Accuracy", "Macro F1"}
    assert 'snapshot_download("acme/query-intents")' in card.text
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

    hub = FakeHub().install(monkeypatch)  # the network is back: retry after the fact
    assert main(["push", str(run), "--repo-id", "acme/x", "--private"]) == 0
    assert hub.repos == [("acme/x", True)] and set(hub.commits[0][1]) == set(p.name for p in upload_files(run))


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
