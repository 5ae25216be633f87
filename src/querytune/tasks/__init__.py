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
class TaskInput:
    """An input a task's `predict` takes besides the queries (rerank's candidates, retrieval's catalogue).

    `querytune predict` gets its flags and `POST /predict` its request fields from these declarations, so neither
    names a task's inputs itself.
    """

    name: str  # the keyword `predict` takes, the flag `--NAME`, the request field
    help: str
    kind: str = "texts"  # "texts": a list of texts (--NAME T ..., --NAME_file FILE; a request field); "path": a file
    item: str = "text"  # what one of the texts is called in an error ("candidate 3 is empty")

    @property
    def in_requests(self) -> bool:
        """Whether `POST /predict` takes it (a path names a file on the serving machine: the CLI only)."""
        return self.kind == "texts"


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's class and its option dataclass live ("module:Name", or the objects themselves), and the inputs
    its predict takes (a tuple of `TaskInput`, or "module:NAME" of one; default: the class's `request_inputs`)."""

    name: str
    task: str | type
    arguments: str | type | tuple | None = None  # one class, or several (its own first, then shared ones)
    inputs: str | tuple | None = None
    offers: frozenset[str] | None = None  # what methods may need of it ("encoder": an encoder with a head)


def _resolve(target: str | type) -> Any:
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(name: str, task: str | type, arguments: str | type | None = None, replace: bool = False,
                  inputs: str | tuple | None = None, offers: frozenset[str] | None = None) -> None:  # fmt: skip
    """Make `task: <name>` train with `task` (a Task subclass); `arguments` is its option dataclass, whose fields
    become flat experiment keys and flags. Defaults to the class's own `arguments` attribute. `inputs`: the
    `TaskInput`s of its predict, where the class is given by path (so that `querytune --help` imports no task).
    `offers`: what a method may need of the task, e.g. {"encoder"} (an encoder with a head: freezing, adapters);
    defaults to the class's `offers` attribute."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"task {name!r} is already registered")
    if arguments is None and not isinstance(task, str):
        arguments = getattr(task, "arguments", None)
    if offers is None and not isinstance(task, str):
        offers = getattr(task, "offers", frozenset())
    _REGISTRY[name] = TaskEntry(name, task, arguments, inputs, frozenset(offers or ()))


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


def _sections(entry: TaskEntry) -> list[type]:
    arguments = entry.arguments if isinstance(entry.arguments, tuple) else (entry.arguments,)
    return [_resolve(a) for a in arguments if a is not None]


def argument_classes() -> list[type]:
    """The option dataclasses of every registered task, once each (imports only the small argument modules)."""
    return list(dict.fromkeys(cls for e in _REGISTRY.values() for cls in _sections(e)))


def sections_of(name: str) -> list[type]:
    """The option dataclasses of one task: its own first, then shared ones (the intent head's OOS options)."""
    entry = _REGISTRY.get(name)
    return _sections(entry) if entry is not None else []


def offers_of(name: str) -> frozenset[str]:
    """What a registered task offers the methods (an unknown task offers nothing)."""
    entry = _REGISTRY.get(name)
    return entry.offers if entry is not None else frozenset()


def inputs_of(name: str) -> tuple[TaskInput, ...]:
    """The inputs a registered task's predict takes besides the queries."""
    entry = _REGISTRY[name]
    if entry.inputs is None:
        return tuple(getattr(get_task(name), "request_inputs", ()))
    return tuple(_resolve(entry.inputs))


def declared_inputs() -> dict[str, tuple[TaskInput, list[str]]]:
    """Every input any registered task takes, by name, with the tasks that take it (the CLI's and the API's fields)."""
    found: dict[str, tuple[TaskInput, list[str]]] = {}
    for name in _REGISTRY:
        for spec in inputs_of(name):
            found.setdefault(spec.name, (spec, []))[1].append(name)
    return found


def arguments_of(name: str) -> type | None:
    """The task's own option dataclass (the first of `sections_of`), or None."""
    found = sections_of(name)
    return found[0] if found else None


_T = "querytune.tasks"
_OOS = f"{_T}.classification.args:OosArguments"  # the intent head's out-of-scope detection (intent_slots too)
ENCODER = frozenset({"encoder"})  # an encoder with a task head: what freezing the body and bottleneck adapters need
for _name, _task, _args, _inputs, _offers in (
    ("intent", f"{_T}.classification.task:ClassificationTask", _OOS, (), ENCODER),
    ("text_classification", f"{_T}.classification.task:ClassificationTask", _OOS, (), ENCODER),
    ("slots", f"{_T}.slots.task:SlotsTask", f"{_T}.slots.args:SlotsArguments", (), ENCODER),
    ("intent_slots", f"{_T}.slots.task:IntentSlotsTask", (f"{_T}.slots.args:SlotsArguments", _OOS), (), ENCODER),
    ("rerank", f"{_T}.ranking.rerank:RerankTask", f"{_T}.ranking.args:RankingArguments",
     f"{_T}.ranking.args:RERANK_INPUTS", ENCODER),
    ("retrieval", f"{_T}.ranking.retrieval:RetrievalTask", f"{_T}.ranking.args:RankingArguments",
     f"{_T}.ranking.args:RETRIEVAL_INPUTS", ENCODER),
    ("rewrite", f"{_T}.rewrite.task:RewriteTask", f"{_T}.rewrite.args:RewriteArguments", (), frozenset({"generator"})),
):  # fmt: skip
    register_task(_name, _task, _args, inputs=_inputs, offers=_offers)
