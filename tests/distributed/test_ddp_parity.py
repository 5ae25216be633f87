"""A real 2-process DDP run on CPU (gloo) must match a single-process run of the same global batch.

Each assertion catches one trap from NOTES.md:
- world_size == 2: `accelerate launch` can silently start ONE process (e.g. with --cpu);
- identical final weights: without a process group each rank trains alone on its shard, unsynchronised;
- identical logged loss: Trainer multiplies the loss by the world size for models whose forward takes **kwargs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..conftest import REPO, build_tiny_checkpoint, tiny_experiment

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train(cmd: list[str], tmp_path: Path, name: str) -> Path:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    (tmp_path / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    # Dropout draws different random numbers per process; without it the two runs are comparable to ~1e-6.
    folder = tmp_path_factory.mktemp("bert_nodrop")
    return build_tiny_checkpoint("bert", folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_match_one(tmp_path, method, no_dropout_bert, tiny_data):
    extra = {"lora_dropout": 0.0} if method == "lora" else {}
    exp = tiny_experiment(tmp_path, no_dropout_bert, tiny_data, method=method, max_steps=4, logging_steps=1,
                          learning_rate=0.005, warmup_steps=0, **extra)  # fmt: skip
    module = [sys.executable, "-m", "querytune.train", str(exp)]
    single = _train([*module, "--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "8"],
                    tmp_path, "single")  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "accelerate_configs/multi_cpu.yaml"), "-m", "querytune.train", str(exp)]  # fmt: skip
    ddp = _train([*launch, "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "4"],
                 tmp_path, "ddp")  # fmt: skip

    results = {name: json.loads((run / "all_results.json").read_text()) for name, run in [("1", single), ("2", ddp)]}
    assert results["1"]["world_size"] == 1
    assert results["2"]["world_size"] == 2, "accelerate started one process"

    def losses(run: Path) -> list[float]:
        return [e["loss"] for e in json.loads((run / "train_log.json").read_text()) if "loss" in e]

    assert len(losses(single)) == 4
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4), "logged loss differs (scaled by world size?)"

    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(single / weights), load_file(ddp / weights)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"final weights differ by {worst}: processes not synchronised"


def test_two_processes_share_the_catalogue_work_of_a_hybrid_retrieval_run(tmp_path, ranking_bert, ranking_data):
    """Catalogue encoding (by chunks) and the evaluation queries (by shares) split across 2 ranks: each rank encodes
    about half of the catalogue, and the metrics, fusion and rankings equal the 1-process run's."""
    from querytune.tasks.ranking.fusion import FUSION_FILE

    from ..conftest import ranking_experiment

    exp = ranking_experiment(tmp_path, ranking_bert, ranking_data, "retrieval", max_steps=2, learning_rate=0.0,
                             retrieval_mode="hybrid", catalogue_chunk_rows=16, log_level="info",
                             log_level_replica="info")  # fmt: skip
    module = [sys.executable, "-m", "querytune.train", str(exp)]
    runs = {}
    for name, cmd in {"single": module, "ddp": [sys.executable, "-m", "querytune.launch", "--config_file",
                      str(REPO / "accelerate_configs/multi_cpu.yaml"), *module[1:]]}.items():  # fmt: skip
        runs[name] = _train([*cmd, "--output_dir", str(tmp_path / name), "--catalogue_cache_dir",
                             str(tmp_path / f"cache_{name}")], tmp_path, name)  # fmt: skip
    one, two = (json.loads((runs[n] / "all_results.json").read_text()) for n in ("single", "ddp"))
    assert two["world_size"] == 2
    # the catalogue metrics must be equal; the in-batch contrastive loss is not compared: its negatives are the
    # other rows of the batch, and batches differ with the number of processes
    keys = [k for k in one if k.startswith(("test_", "eval_")) and not k.endswith(("runtime", "per_second", "_loss"))]
    assert any("ndcg" in k for k in keys) and any("bm25_" in k for k in keys), keys
    assert {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-6)
    assert (runs["ddp"] / FUSION_FILE).read_text() == (runs["single"] / FUSION_FILE).read_text()
    ranked = {n: [json.loads(line) for line in (runs[n] / "test_rankings.jsonl").read_text().splitlines()]
              for n in ("single", "ddp")}  # fmt: skip
    assert [r["query"] for r in ranked["ddp"]] == [r["query"] for r in ranked["single"]]
    for one_q, two_q in zip(ranked["single"], ranked["ddp"], strict=True):  # same products, same order
        assert [h["doc_id"] for h in two_q["hits"]] == [h["doc_id"] for h in one_q["hits"]], one_q["query"]
        assert [h["score"] for h in two_q["hits"]] == pytest.approx([h["score"] for h in one_q["hits"]], abs=1e-4)

    log = (tmp_path / "ddp.log").read_text()
    shares = [re.search(rf"encoding (\d+) of (\d+) rows in \d+ chunks \(rank {r} of 2\)", log) for r in (0, 1)]
    assert all(shares), log[-3000:]
    encoded, total = [int(m[1]) for m in shares], int(shares[0][2])
    assert sum(encoded) == total and max(encoded) <= total // 2 + 16, (encoded, total)
