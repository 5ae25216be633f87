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

from querytune.errors import PushError
from querytune.models import MINILM_NAMES, MPNET_NAMES
from querytune.runs import CONFIG_FILE, LABEL_MAP, METRICS_FILE, read_run
from querytune.tasks import get_task

logger = logging.getLogger(__name__)

# Never uploaded: optimizer state lives in checkpoints, and training_args.bin is a pickle that can hold a token.
EXCLUDED = {"training_args.bin"}


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
    task = get_task(info["task"])
    label_info = json.loads((run / LABEL_MAP).read_text()) if (run / LABEL_MAP).is_file() else {}
    task_type, extra_tags = task.card_info(label_info)
    card_metrics = task.card_metrics
    split = "test" if any(k.startswith("test_") for k in metrics) else "validation"
    prefix = "test" if split == "test" else "eval"
    shown = {
        k: metrics[f"{prefix}_{k}"] for k in card_metrics if isinstance(metrics.get(f"{prefix}_{k}"), int | float)
    }
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset or info.get("dataset") or "custom",
            dataset_name=dataset or Path(str(info.get("dataset"))).name,
            dataset_config=config.get("dataset_config_name"),
            dataset_split=split,
            metric_type=card_metrics[k][0],
            metric_name=card_metrics[k][1],
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
    rows = "\n".join(f"| {card_metrics[k][1]} ({split}) | {card_metrics[k][2] * v:.{2 if card_metrics[k][2] > 1 else 3}f}"
                     f"{' %' if card_metrics[k][2] == 100 else ''} |" for k, v in shown.items())  # fmt: skip
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

| metric | value |
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


def write_model_card(output_dir: Path, info: dict[str, Any]) -> None:
    """The run's README: the same card that `querytune push` uploads."""
    model_card(output_dir, info).save(output_dir / "README.md")


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
