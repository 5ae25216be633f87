"""Sharing runs on the Hugging Face Hub: the model card and the push.

A run is pushed as the exact set of files another machine needs to load and predict with it (adapter or model
with its head, tokenizer, label map, resolved config, metrics, reports and the card), never checkpoints or the
pickled training arguments. `HfApi.create_repo` and `HfApi.create_commit` are the only network calls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from querytune.models import MINILM_NAMES, MPNET_NAMES
from querytune.runs import CONFIG_FILE, METRICS_FILE, read_run

logger = logging.getLogger(__name__)

# Never uploaded: optimizer state lives in checkpoints, and training_args.bin is a pickle that can hold a token.
EXCLUDED = {"training_args.bin"}
TASK_TAGS = {
    "intent": ("text-classification", "intent-classification"),
    "text_classification": ("text-classification",),
    "slots": ("token-classification", "slot-filling"),
    "intent_slots": ("token-classification", "intent-classification", "slot-filling"),
}
# Metrics shown in the card and in model-index, with their model-index metric type and display name.
CARD_METRICS = {
    "accuracy": ("accuracy", "Accuracy"),
    "macro_f1": ("f1", "Macro F1"),
    "in_scope_accuracy": ("accuracy", "In-scope accuracy"),
    "oos_recall": ("recall", "Out-of-scope recall"),
    "f1": ("f1", "Slot F1 (entity-level)"),  # slots
    "slot_f1": ("f1", "Slot F1 (entity-level)"),  # intent_slots
    "intent_accuracy": ("accuracy", "Intent accuracy"),
    "exact_match": ("exact_match", "Exact match (intent and all slots)"),
}


class PushError(RuntimeError):
    """A failed upload; the local run is untouched and the message says how to retry."""


def hub_model_id(name: str) -> str | None:
    """The Hub id of a base model, or None for a local folder (which a card cannot reference)."""
    lowered = name.lower()
    if lowered in MINILM_NAMES:
        return "sentence-transformers/all-MiniLM-L6-v2"
    if lowered in MPNET_NAMES:
        return "sentence-transformers/all-mpnet-base-v2"
    return None if Path(name).exists() or name.startswith((".", "/", "~")) else name


def _dataset_id(name: str | None) -> str | None:
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name == "demo-queries":
        return None
    return name


def model_card(run_dir: str | Path, info: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """A card with a valid metadata block (library, base model, datasets, tags, model-index) and a usage snippet."""
    run = Path(run_dir)
    metrics = json.loads((run / METRICS_FILE).read_text()) if (run / METRICS_FILE).is_file() else info["metrics"]
    import yaml

    config = yaml.safe_load((run / CONFIG_FILE).read_text()) if (run / CONFIG_FILE).is_file() else {}
    base = hub_model_id(info["base_model"])
    dataset = _dataset_id(info.get("dataset"))
    task_type, *extra_tags = TASK_TAGS.get(info["task"], ("text-classification",))
    split = "test" if any(k.startswith("test_") for k in metrics) else "validation"
    prefix = "test" if split == "test" else "eval"
    shown = {k: metrics[f"{prefix}_{k}"] for k in CARD_METRICS if f"{prefix}_{k}" in metrics}
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset or info.get("dataset") or "custom",
            dataset_name=dataset or Path(str(info.get("dataset"))).name,
            dataset_config=config.get("dataset_config_name"),
            dataset_split=split,
            metric_type=CARD_METRICS[k][0],
            metric_name=CARD_METRICS[k][1],
            metric_value=round(float(v), 4),
        )
        for k, v in shown.items()
    ]
    name = (repo_id or info["run_name"]).split("/")[-1]
    data = ModelCardData(
        library_name="peft" if info.get("peft") else "transformers",
        base_model=base,
        datasets=[dataset] if dataset else None,
        tags=["querytune", *extra_tags, info["method"]],
        pipeline_tag=task_type,
        model_name=name,
        eval_results=eval_results or None,
    )
    rows = "\n".join(f"| {CARD_METRICS[k][1]} ({split}) | {100 * v:.2f} |" for k, v in shown.items())
    source = repo_id or str(run)
    load = f'snapshot_download("{repo_id}")' if repo_id else f'"{run}"'
    body = f"""
# {name}

Fine-tuned with [querytune](https://github.com/querytune/querytune) for **{info["task"].replace("_", " ")}**
on `{info.get("dataset")}` ({info["num_labels"]} labels).

- Base model: `{base or info["base_model"]}`
- Method: **{info["method"]}**: {info["trainable_params"]:,} trainable of {info["total_params"]:,} parameters
  ({info["trainable_percent"]:.3f}%)
- Training: {info["train_runtime_s"]:.0f} s at {info["train_samples_per_second"]:.1f} samples/s

| metric | % |
|---|---|
{rows}

## Use

```python
from huggingface_hub import snapshot_download
from querytune.inference import LoadedRun
print(LoadedRun({load}).predict(["where is my package"]))
```

or from the shell: `querytune predict {source} "where is my package"`. The folder holds the label map
(`label_map.json`), the resolved experiment (`{CONFIG_FILE}`) and per-label reports.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def upload_files(run_dir: str | Path) -> list[Path]:
    """The files of a finished run that go to the Hub (top level only: no checkpoints, no evals)."""
    run = Path(run_dir)
    return sorted(p for p in run.iterdir() if p.is_file() and p.name not in EXCLUDED and not p.name.endswith(".tmp"))


def push_run(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Write the card for `repo_id` into the run, then upload the run's files in one commit. Returns the URL."""
    run = Path(run_dir)
    info = read_run(run)
    model_card(run, info, repo_id).save(run / "README.md")
    files = upload_files(run)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
        api.create_commit(repo_id, operations=operations, commit_message=f"querytune: {info['run_name']}")
    except Exception as err:  # any network / auth / server failure: the local run stays as it is
        raise PushError(
            f"push of {run} to {repo_id} failed ({type(err).__name__}: {err}). The local run is complete and "
            f"unchanged; retry with: querytune push {run} --repo-id {repo_id}"
        ) from err
    logger.info("pushed %d files of %s to %s", len(files), run, url)
    return str(url)
