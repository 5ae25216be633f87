"""The optional parts of querytune (the extras of pyproject.toml) and the one-line error when one is missing.

The core trains and evaluates intent, slots and ranking with every method. The rest is imported where it is used,
through `require`, so that a missing extra is one line naming it (and exit 2 on the command line) instead of a
traceback, and `import querytune.train` / `querytune --help` work without any of them:

    ort = require("onnxruntime", extra="export", feature="running an ONNX export")
    require_extra("serve", "querytune serve")  # every module of the extra, before importing code that needs them
"""

from __future__ import annotations

import importlib
from types import ModuleType

from querytune.errors import MissingExtraError

# Extra -> the modules querytune imports from it (tests/test_extras.py checks this table against pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {
    "tracking": ("wandb",),
    "sweep": ("optuna", "sqlalchemy"),
    "postgres": ("psycopg",),
    "search": ("faiss", "ranx"),
    "export": ("onnx", "onnxscript", "onnx_ir", "onnxruntime"),
    "openvino": ("openvino",),
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic"),
    "rewrite": ("rouge_score", "sacrebleu", "gguf"),
}


def missing_extra(extra: str, feature: str, missing: str | None = None) -> MissingExtraError:
    """The error for `feature` used without `extra`; `missing` names the module that was not found."""
    why = f" ({missing} is not installed)" if missing else ""
    return MissingExtraError(
        f"{feature} needs the '{extra}' extra{why}: pip install 'querytune[{extra}]'", name=missing
    )


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise MissingExtraError naming `extra` when it (or a module it needs) is not
    installed. Any other import failure (a broken or incompatible install) propagates unchanged."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise missing_extra(extra, feature, err.name or module) from err


def require_extra(extra: str, feature: str) -> None:
    """Import every module of `extra` (`EXTRAS`), for code that imports them at module level."""
    for module in EXTRAS[extra]:
        require(module, extra=extra, feature=feature)
