"""Tasks: what a kind of query data needs. Each task is a package (`tasks/<name>/`) with a `Task` class.

The registry maps a task name to its `Task` class and to the dataclass of its own options. It is cheap to import:
the `Task` classes (which import torch and transformers) are imported when `get_task` asks for one, while config
parsing only imports the small argument modules. A new task is one package plus one `register_task` call
(see CONTRIBUTING.md); nothing else in querytune branches on a task's name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's class and its option dataclass live ("module:Name", or the objects themselves)."""

    name: str
    task: str | type
    arguments: str | type | None = None


def _resolve(target: str | type) -> Any:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(name: str, task: str | type, arguments: str | type | None = None, replace: bool = False) -> None:
    """Make `task: <name>` train with `task` (a Task subclass); `arguments` is its option dataclass, whose fields
    become flat experiment keys and flags. Defaults to the class's own `arguments` attribute."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"task {name!r} is already registered")
    if arguments is None and not isinstance(task, str):
        arguments = getattr(task, "arguments", None)
    _REGISTRY[name] = TaskEntry(name, task, arguments)


def unregister_task(name: str) -> None:
    _REGISTRY.pop(name, None)


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_task(name: str):
    """The Task class of a registered task (imports its package)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {sorted(_REGISTRY)}")
    return _resolve(_REGISTRY[name].task)


def task_classes() -> list:
    """Every registered Task class, once each, in registration order (imports every task package)."""
    return list(dict.fromkeys(get_task(name) for name in _REGISTRY))


def argument_classes() -> list[type]:
    """The option dataclasses of every registered task, once each (imports only the small argument modules)."""
    return list(dict.fromkeys(_resolve(e.arguments) for e in _REGISTRY.values() if e.arguments is not None))


def arguments_of(name: str) -> type | None:
    """The option dataclass of one task, or None."""
    entry = _REGISTRY.get(name)
    return _resolve(entry.arguments) if entry is not None and entry.arguments is not None else None


_T = "querytune.tasks"
for _name, _task, _args in (
    ("intent", f"{_T}.classification.task:ClassificationTask", None),
    ("text_classification", f"{_T}.classification.task:ClassificationTask", None),
    ("slots", f"{_T}.slots.task:SlotsTask", f"{_T}.slots.args:SlotsArguments"),
    ("intent_slots", f"{_T}.slots.task:IntentSlotsTask", f"{_T}.slots.args:SlotsArguments"),
    ("rerank", f"{_T}.ranking.rerank:RerankTask", f"{_T}.ranking.args:RankingArguments"),
    ("retrieval", f"{_T}.ranking.retrieval:RetrievalTask", f"{_T}.ranking.args:RankingArguments"),
    ("rewrite", f"{_T}.rewrite.task:RewriteTask", f"{_T}.rewrite.args:RewriteArguments"),
):
    register_task(_name, _task, _args)
