"""Sharing runs on the Hugging Face Hub: the model card and the push.

A run is pushed as the exact set of files another machine needs to load and predict with it (adapter or model
with its head and model config, tokenizer, label map, resolved config, metrics, reports and the card), never
checkpoints or the pickled training arguments. `HfApi.create_repo` and `HfApi.create_commit` are the only network
calls; each request times out after QUERYTUNE_HUB_TIMEOUT seconds (default 60), so an unreachable Hub fails the push
instead of hanging it.

The card's snippet loads the run with plain PEFT / transformers, in a process that never imports querytune.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from querytune.errors import PushError
from querytune.gguf import SMOLLM2_NAMES
from querytune.methods import get_method
from querytune.models import MINILM_NAMES, MPNET_NAMES
from querytune.runs import (
    CONFIG_FILE,
    FAILED_AFTER_TRAINING,
    FINISHED,
    LABEL_MAP,
    MARKER,
    METRICS_FILE,
    read_run,
    write_json_atomic,
)
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
    if lowered in SMOLLM2_NAMES:  # querytune's offline copy is a dequantised 4-bit GGUF of this checkpoint
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
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
{training_data_section(info.get("training_data"))}{task.card_notes(run)}
## Use

{usage_section(task, label_info, info, source)}

With querytune (`pip install querytune`), which adds the task's own prediction (labels with scores, spans,
rankings or rewrites):

```python
from huggingface_hub import snapshot_download
from querytune.inference import LoadedRun
print(LoadedRun({load}).predict(["where is my package"]))
```

or from the shell: `querytune predict RUN_DIR "where is my package"`. The folder holds the label map
(`label_map.json`), the resolved experiment (`{CONFIG_FILE}`) and per-label reports.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def usage_section(task: Any, label_info: dict[str, Any], info: dict[str, Any], source: str) -> str:
    """How to load the run without querytune: transformers for a full fine-tune, PEFT's Auto class for an adapter
    (with the run's label maps, read from its config.json), after one registration call for an adapter type that
    PEFT does not ship."""
    classes = task.auto_classes(label_info)
    if classes is None:
        return (f"The model class of a {info['task']} run is querytune's own, so the run loads with querytune "
                "(below), not with a transformers Auto class.")  # fmt: skip
    auto, peft_auto = classes
    if not info.get("peft"):
        code = (f"from transformers import {auto}, AutoTokenizer\n\nmodel = {auto}.from_pretrained(\"{source}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{source}\")")  # fmt: skip
        return f"With transformers alone:\n\n```python\n{code}\n```"
    heads = peft_auto.endswith("Classification")  # a trained head whose size and labels the Hub base model lacks
    lines = [
        f"from transformers import {'AutoConfig, ' if heads else ''}AutoTokenizer",
        f"from peft import {peft_auto}",
    ]
    if heads:
        lines += ["", f'config = AutoConfig.from_pretrained("{source}")  # the run\'s label count and names',
                  f'model = {peft_auto}.from_pretrained(', f'    "{source}", num_labels=config.num_labels, '
                  "id2label=config.id2label, label2id=config.label2id", ")"]  # fmt: skip
    else:
        lines += ["", f'model = {peft_auto}.from_pretrained("{source}")']
    lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{source}")')
    base = hub_model_id(info["base_model"]) or info["base_model"]
    registration = get_method(info["method"]).peft_registration
    if registration is None:
        return (f"With PEFT alone (it fetches the base model `{base}` named in `adapter_config.json`):\n\n"
                "```python\n" + "\n".join(lines) + "\n```")  # fmt: skip
    module, _, function = registration.partition(":")
    return (
        f"The {info['method']} adapter type is querytune's own, not PEFT's: PEFT loads it once querytune has "
        f"registered it, which the first two lines do; the rest is plain PEFT (it fetches the base model `{base}`).\n\n"
        f"```python\nimport {module}\n{module}.{function}()\n" + "\n".join(lines) + "\n```"
    )


def training_data_section(data: dict[str, Any] | None) -> str:
    """What the model was trained on when the train split was sampled per label or augmented (the run's counts)."""
    if not data:
        return ""
    lines = ["", "## Training data", ""]
    if data.get("max_train_samples_per_label"):
        lines.append(f"- At most {data['max_train_samples_per_label']} train rows per label (a seeded sample).")
    if data.get("augment"):
        lines.append(
            f"- Augmented with {', '.join(data['augment'])}: {data.get('augment_generated', 0):,} rows generated, "
            f"{data.get('augment_dropped_duplicate', 0):,} dropped as duplicates (of which "
            f"{data.get('augment_dropped_heldout', 0):,} copied a validation or test query), "
            f"{data.get('augment_dropped_filter', 0):,} dropped by the consistency filter, "
            f"{data.get('augment_kept', 0):,} kept: {data.get('train_rows_augmented', 0):,} train rows from "
            f"{data.get('train_rows_original', 0):,} (`augmented_train.jsonl` lists the new rows)."
        )
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: Path, info: dict[str, Any]) -> None:
    """The run's README: the same card that `querytune push` uploads."""
    model_card(output_dir, info).save(output_dir / "README.md")


def upload_files(run_dir: str | Path) -> list[Path]:
    """The files of a finished run that go to the Hub (top level only: no checkpoints, no evals)."""
    run = Path(run_dir)
    return sorted(p for p in run.iterdir() if p.is_file() and p.name not in EXCLUDED and not p.name.endswith(".tmp"))


HUB_TIMEOUT_S = 60.0  # per request, unless QUERYTUNE_HUB_TIMEOUT says otherwise
PUSH_STATUSES = (FINISHED, FAILED_AFTER_TRAINING)  # a run whose push failed is pushed again with `querytune push`


def request_timeout() -> float:
    """Seconds one Hub request may take (connect, send or wait for an answer): QUERYTUNE_HUB_TIMEOUT or 60."""
    value = os.environ.get("QUERYTUNE_HUB_TIMEOUT")
    try:
        timeout = float(value) if value else HUB_TIMEOUT_S
    except ValueError:
        raise PushError(f"QUERYTUNE_HUB_TIMEOUT must be a number of seconds, got {value!r}") from None
    if timeout <= 0:
        raise PushError(f"QUERYTUNE_HUB_TIMEOUT must be positive, got {value!r}")
    return timeout


def push_run(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
             marker: dict[str, Any] | None = None, allow_status: tuple[str, ...] | str | None = PUSH_STATUSES) -> str:  # fmt: skip
    """Write the card for `repo_id` into the run, then upload the run's files in one commit. Returns the URL.

    `marker`: the marker to upload, for a training that pushes before it writes its own (the pushed copy says
    `finished` although the local marker is written only after the push). Pushing a run that is marked
    `failed_after_training` only because its push failed marks it `finished`.
    """
    import httpx2
    from huggingface_hub import get_session

    run = Path(run_dir)
    info = marker if marker is not None else read_run(run, allow_status)
    retry_fixes_it = marker is None and [f["stage"] for f in info.get("failures", [])] == ["hub_push"]
    if retry_fixes_it:
        info = {k: v for k, v in info.items() if k != "failures"} | {"status": FINISHED}
    model_card(run, info, repo_id).save(run / "README.md")
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                  for p in upload_files(run) if p.name != MARKER]  # fmt: skip
    operations.append(CommitOperationAdd(path_in_repo=MARKER, path_or_fileobj=json.dumps(info, indent=2).encode()))
    api = HfApi(token=token)
    timeout = request_timeout()
    # huggingface_hub waits forever by default: an unreachable or silent Hub would hang the end of a training.
    session = get_session()
    previous = session.timeout
    if previous.connect is None and previous.read is None:
        session.timeout = httpx2.Timeout(timeout, connect=min(timeout, 10.0))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations=operations, commit_message=f"querytune: {info['run_name']}")
    except Exception as err:  # any network / auth / server failure: the local run stays as it is
        raise PushError(
            f"push of {run} to {repo_id} failed ({type(err).__name__}: {err}). The local run is complete and "
            f"unchanged; retry with: querytune push {run} --repo-id {repo_id}"
        ) from err
    finally:
        session.timeout = previous
    if retry_fixes_it:
        write_json_atomic(run / MARKER, info)
    logger.info("pushed %d files of %s to %s", len(operations), run, url)
    return str(url)
