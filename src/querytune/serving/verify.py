"""Verifying an export against the PyTorch run: held-out (and training) samples, the outputs of an intermediate
graph, and top-1 agreement with the largest logit difference per output."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from querytune.errors import ExportError
from querytune.inference import LoadedRun

logger = logging.getLogger(__name__)


# --- verification
def held_out_sample(loaded: LoadedRun, n: int, seed: int = 0) -> tuple[list[str], list[str] | None, str]:
    """Up to `n` queries (and text pairs) from the run's test split, else its validation split.

    A seeded random sample, or the split's first rows where the task compares whole groups (a query's documents).
    """
    data, task = loaded.config.data, loaded.task
    errors = []
    for split in dict.fromkeys([data.test_split, data.validation_split]):
        if not split:
            continue
        try:
            texts, pairs = task.verification_texts(loaded, split)
        except Exception as err:  # noqa: BLE001  (any failure to read the split: try the next, then explain)
            errors.append(f"{split}: {err}")
            continue
        if task.verification_grouped:
            keep = list(range(min(n, len(texts))))
        else:
            keep = sorted(random.Random(seed).sample(range(len(texts)), min(n, len(texts))))
        return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None, split
    raise ExportError(
        f"could not read a held-out split of {data.dataset_name or data.test_file} to verify the export "
        f"({'; '.join(errors)}); pass --verify_file with one query per line"
    )


def compare_outputs(
    reference: dict[str, Any], exported: dict[str, Any], groups: list[str] | None = None
) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute logit difference per output (NaN padding ignored).

    A one-score output (a cross-encoder) has no top-1 label: there, top-1 is the best-scored row of each group
    (the best document of each query in `groups`).
    """
    result: dict[str, Any] = {}
    for name, ref in reference.items():
        exp = exported[name]
        valid = ~np.isnan(ref).any(axis=-1)
        if ref.shape[-1] == 1 and groups is not None:
            rows: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                rows.setdefault(g, []).append(i)
            same = np.array([np.argmax(ref[r, 0]) == np.argmax(exp[r, 0]) for r in rows.values() if len(r) > 1])
            result[name] = {"top1_agreement": float(same.mean()) if same.size else 1.0,
                            "max_abs_logit_diff": float(np.max(np.abs(ref - exp))), "compared": int(same.size),
                            "compared_unit": "best document per query"}  # fmt: skip
            continue
        same = np.argmax(np.nan_to_num(ref[valid]), -1) == np.argmax(np.nan_to_num(exp[valid]), -1)
        result[name] = {
            "top1_agreement": float(same.mean()) if same.size else 1.0,
            "max_abs_logit_diff": float(np.max(np.abs(ref[valid] - exp[valid]))) if same.size else 0.0,
            "compared": int(same.size),
        }
    return result


def training_sample(run: LoadedRun, n: int, seed: int = 0) -> tuple[list[str], list[str] | None]:
    """Up to `n` queries (and text pairs) of the run's train split: calibration never sees the held-out queries."""
    texts, pairs = run.task.verification_texts(run, run.config.data.train_split)
    keep = sorted(random.Random(seed).sample(range(len(texts)), min(n, len(texts))))
    return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None


def graph_outputs(run: LoadedRun, graph: Path, texts: list[str], pairs: list[str] | None) -> dict[str, Any]:
    """A task's verification outputs with `graph` in place of the run's model (an intermediate graph to check)."""
    from querytune.inference import OnnxModel

    probe = copy.copy(run)  # same tokenizer, task and config; only the model differs
    probe.model = OnnxModel(graph, threads=torch.get_num_threads())
    return probe.task.verification_outputs(probe, texts, pairs)
