"""benchmarks/device_check.py, the prepared GPU check, dry-run on CPU with a tiny model and tiny data: every row's
command must run to the end here, so that the first call on a lent GPU measures instead of debugging."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import build_tiny_checkpoint, make_rows, ranking_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _intent_data(root: Path) -> Path:
    for split, (n, seed) in {"train": (8, 0), "validation": (3, 1), "test": (3, 2)}.items():
        oos = [{"text": f"tell me a joke number {i}", "intent": "oos"} for i in range(n)]
        write_jsonl(root / f"{split}.jsonl", make_rows(n, seed) + oos)
    return root


def test_device_check_dry_run_runs_every_row(tmp_path: Path) -> None:
    from tests.conftest import EXTRA_WORDS

    model = build_tiny_checkpoint("bert", tmp_path / "bert", EXTRA_WORDS)
    clinc = _intent_data(tmp_path / "clinc150")
    homedepot = write_jsonl(tmp_path / "homedepot" / "train.jsonl", ranking_rows(60, 0)).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "DRY": "1", "MODEL": str(model),
           "CLINC": str(clinc), "HOMEDEPOT": str(homedepot), "WORKDIR": str(tmp_path / "work")}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)  # fmt: skip
    out = tmp_path / "out" / "device_check.md"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in rows] == ["clinc150-lora-bf16", "homedepot-biencoder-bf16-hybrid", "fsdp-1gpu",
                                        "deepspeed-zero2-1gpu"]  # fmt: skip
    for row in rows:
        assert row["exit"] == 0 and not row["error"], row
        assert row["train_loss"] > 0, row  # each row trained and wrote its results
        assert row["ran_as"] in ("NO", "MULTI_CPU"), row  # on CPU accelerate runs FSDP and DeepSpeed rows without them
    assert "test_ndcg@10" in rows[1] and "test_bm25_ndcg@10" in rows[1]  # the hybrid row searched
    table = out.read_text()
    assert table.startswith("# GPU check on CPU dry run") and table.count("\n| ") == 6  # header, rule, 4 rows
