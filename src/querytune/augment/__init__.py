"""Augmenters: new train rows made from the train split, registered by name like methods and tasks.

An augmenter is a class (`querytune.augment.base.Augmenter`) with its own option dataclass, in one file under
`querytune/augment/`. The registry maps a name (`eda`, `mlm`, `paraphrase`, `backtranslate`, `slot_swap`) to the
class by dotted path. Config parsing imports the augmenter modules for their option dataclasses, so they are cheap to
import: models and torch load when an augmenter is prepared. A plugin or a test calls `register_augmenter`.

`querytune.augment.pipeline.augment_train` applies the run's `augment` list to its train split (see
`querytune.augment.args.AugmentArguments`).
"""

from __future__ import annotations

import importlib
from typing import Any

_REGISTRY: dict[str, str | type] = {}


def register_augmenter(name: str, target: str | type, replace: bool = False) -> None:
    """Make `augment: [<name>]` use `target`, an `Augmenter` subclass or its "module:Class" path."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"augmenter {name!r} is already registered")
    _REGISTRY[name] = target


def unregister_augmenter(name: str) -> None:
    _REGISTRY.pop(name, None)


def augmenter_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_augmenter(name: str) -> Any:
    """The Augmenter class registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown augmenter {name!r}; known: {', '.join(_REGISTRY)}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def option_classes() -> list[type]:
    """The option dataclass of every registered augmenter that has one, once each, in registration order."""
    return list(dict.fromkeys(c for c in (get_augmenter(n).options for n in _REGISTRY) if c is not None))


def options_owner(option: str) -> str | None:
    """The augmenter whose options include the key `option`, or None."""
    import dataclasses

    for name in _REGISTRY:
        options = get_augmenter(name).options
        if options is not None and option in {f.name for f in dataclasses.fields(options)}:
            return name
    return None


_A = "querytune.augment"
for _name in ("eda", "mlm", "paraphrase", "backtranslate", "slot_swap"):
    register_augmenter(_name, f"{_A}.{_name}:{''.join(p.title() for p in _name.split('_'))}Augmenter")
