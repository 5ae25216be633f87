"""The GPU check: bf16 training of CLINC150 LoRA and of the Home Depot bi-encoder (one epoch each, the bi-encoder with
its hybrid row), then FSDP and DeepSpeed ZeRO-2 launched on the one GPU, as one table (`--out`).

Run through `benchmarks/device_check.sh` on a lent GPU (it installs the carried wheels and unpacks the weights), or
dry-run on CPU with a tiny model and tiny data (`--dry`: 5 steps per row, `use_cpu`, the same commands otherwise):

    python benchmarks/device_check.py --model M --clinc150 C --homedepot H --out table.md [--dry]

Every row is one `querytune train` (or `querytune launch ... -m querytune.train`) in its own process, timed from
start to exit; a row that fails is a row in the table (its exit code and last error line), never a stopped script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
CONFIGS = REPO / "accelerate_configs"


def rows(args: argparse.Namespace) -> dict[str, tuple[list[str], str]]:
    """Row name -> (command, what the row shows)."""
    py = [sys.executable, "-m"]
    base = ["--model_name_or_path", args.model, "--bf16", "true", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true"]  # fmt: skip
    short = ["--max_steps", "5", "--use_cpu", "true", "--eval_strategy", "no"] if args.dry else []
    clinc = ["--dataset_name", args.clinc150]
    hd = ["--dataset_name", args.homedepot, "--retrieval_mode", "hybrid", "--catalogue_cache_dir",
          str(Path(args.runs) / "catalogue")]  # fmt: skip
    if args.dry:
        hd += ["--max_eval_queries", "20"]
    one_gpu = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16"]
    full = [*py, "querytune.train", str(EXP / "intent" / "clinc150-full.yaml"), *base, *clinc,
            "--max_steps", "5" if args.dry else "300", "--eval_strategy", "no"]  # fmt: skip
    if args.dry:
        full += ["--use_cpu", "true"]
    launch = [*py, "querytune.launch", "--join_timeout_s", "120"]
    return {
        "clinc150-lora-bf16": (
            [*py, "querytune.train", str(EXP / "intent" / "clinc150-lora.yaml"), *base, *clinc,
             "--num_train_epochs", "1", *short, "--output_dir", str(Path(args.runs) / "clinc150-lora-bf16")],
            "LoRA r=8, 1 epoch, bf16"),
        "homedepot-biencoder-bf16-hybrid": (
            [*py, "querytune.train", str(EXP / "relevance" / "homedepot-retrieval-full.yaml"), *base, *hd, *short,
             "--output_dir", str(Path(args.runs) / "homedepot-biencoder-bf16")],
            "bi-encoder, full FT, 1 epoch, bf16, hybrid (BM25 + dense) search"),
        "fsdp-1gpu": (
            [*launch, "--config_file", str(CONFIGS / "fsdp.yaml"), *one_gpu, "-m", *full[2:],
             "--output_dir", str(Path(args.runs) / "fsdp")],
            "accelerate_configs/fsdp.yaml on 1 process, CLINC150 full FT, 300 steps"),
        "deepspeed-zero2-1gpu": (
            [*launch, "--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), *one_gpu, "-m", *full[2:],
             "--output_dir", str(Path(args.runs) / "zero2")],
            "accelerate_configs/deepspeed_zero2.yaml on 1 process, CLINC150 full FT, 300 steps"),
    }  # fmt: skip


def figures(run: Path) -> dict[str, float]:
    path = run / "all_results.json"
    if not path.is_file():
        return {}
    found = json.loads(path.read_text())
    marker = run / "querytune_run.json"  # how the job really ran: DEEPSPEED / FSDP / MULTI_GPU / NO ...
    if marker.is_file():
        found["ran_as"] = json.loads(marker.read_text()).get("distributed", {}).get("type", "?")
    keep = ("train_samples_per_second", "train_loss", "test_in_scope_accuracy", "test_oos_recall", "test_ndcg@10",
            "test_bm25_ndcg@10", "test_dense_ndcg@10", "peak_memory_mb", "world_size")  # fmt: skip
    return {k: found[k] for k in (*keep, "ran_as") if k in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clinc150", required=True)
    parser.add_argument("--homedepot", required=True)
    parser.add_argument("--runs", default="/tmp/qt-device-check")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows")
    parser.add_argument("--dry", action="store_true", help="CPU dry run: 5 steps per row, use_cpu")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    if args.dry:
        env["ACCELERATE_USE_CPU"] = "1"
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    table = []
    for name, (cmd, what) in rows(args).items():
        if args.rows and name not in args.rows:
            continue
        log = Path(args.runs) / f"{name}.log"
        start = time.perf_counter()
        with log.open("w") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        wall = time.perf_counter() - start
        run = Path(cmd[cmd.index("--output_dir") + 1])
        found = figures(run)
        error = ""
        if code != 0:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            error = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")[:200]
        table.append({"row": name, "what": what, "exit": code, "wall_s": wall, **found, "error": error})
        print(f"{name}: exit {code}, {wall:.0f} s {found} {error}", flush=True)
    device = "CPU dry run (tiny model, 5 steps)" if args.dry else _gpu_name()
    lines = [f"# GPU check on {device}", "",
             "| row | what | ran as | exit | wall s | train samples/s | train loss | test metric | peak GPU MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    for r in table:
        metric = ", ".join(f"{k[5:]} {100 * r[k]:.2f}" for k in ("test_in_scope_accuracy", "test_oos_recall",
                           "test_ndcg@10", "test_bm25_ndcg@10", "test_dense_ndcg@10") if k in r)  # fmt: skip
        lines.append(f"| {r['row']} | {r['what']} | {r.get('ran_as', '-')} | {r['exit']} | {r['wall_s']:.0f} | "
                     f"{r.get('train_samples_per_second', float('nan')):.0f} | {r.get('train_loss', float('nan')):.4f} | "
                     f"{metric or r['error'] or '-'} | {r.get('peak_memory_mb', float('nan')):.0f} |")  # fmt: skip
    Path(args.out).write_text("\n".join(lines) + "\n")
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(table, indent=1))
    print("\n".join(lines))
    sys.exit(0 if all(r["exit"] == 0 for r in table) else 1)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU found"


if __name__ == "__main__":
    main()
