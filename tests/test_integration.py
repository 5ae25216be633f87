"""Integration: the real all-MiniLM-L6-v2 on a CLINC150 slice from ../shared/data, offline, end to end."""

from __future__ import annotations

import json

import pytest

from querytune.cli import main

from .conftest import REPO, SHARED_DATA, corpus_slice

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLINC = SHARED_DATA / "clinc150"


@pytest.mark.skipif(not CLINC.is_dir(), reason="../shared/data/clinc150 is not present")
def test_minilm_learns_a_clinc150_slice_and_predicts(tmp_path, capsys):
    # the first 20 intents (sorted) plus oos
    first20 = lambda labels: set(sorted(labels - {"oos"})[:20]) | {"oos"}  # noqa: E731
    data = corpus_slice(CLINC, tmp_path / "clinc", first20, {"train": 50, "validation": 10, "test": 30})
    out = tmp_path / "run"
    args = ["train", str(REPO / "experiments/intent/clinc150-lora.yaml"), "--dataset_name", str(data),
            "--output_dir", str(out), "--num_train_epochs", "4", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--disable_tqdm", "true"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "all_results.json").read_text())
    # 21 labels (chance 4.8%), 50 examples per intent, 4 epochs of LoRA.
    assert metrics["test_in_scope_accuracy"] > 0.85, metrics
    assert main(["predict", str(out), "book me a flight from boston to denver", "--top_k", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["label"] == "book_flight"
    assert main(["eval", str(out), "--dataset_name", str(data), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["in_scope_accuracy"] == pytest.approx(
        metrics["test_in_scope_accuracy"], abs=1e-6
    )
