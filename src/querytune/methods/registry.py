"""One record per method: everything the rest of querytune needs to know about it, in one place.

A method is a `MethodSpec`: its builder `(model, MethodArguments, MethodContext) -> model`, its own option dataclass
(flat, prefixed keys: `lora_r`, `prefix_num_virtual_tokens`, ... so that sweeps and flags reach them) and its traits:
whether it goes through PEFT, whether its weights fold into the base model, how many virtual tokens it puts in front
of the input, whether it works with gradient checkpointing, what it needs from a task, the Trainer callbacks it needs
and the files a resumable checkpoint of it holds. Nothing outside the records compares method names: code asks
`get_method(name).mergeable` and so on; and no record names a task: a method says what it `needs` (an encoder with a
head), a task what it offers (`querytune.tasks.register_task(..., offers=...)`).

The built-in methods live one family to a file (`full`, `lora`, `ia3`, `prompt_learning`, `adapter`), each with its
options, its builders and its `register_method` lines. Adding a method is one file plus one `register_method` call
(see CONTRIBUTING.md).

This module and the family files are cheap to import (no torch, transformers or peft): config parsing uses them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The methods querytune ships (registered by the family files imported at the end); for the help text.
BUILTIN_METHODS = ("full", "freeze", "lora", "adalora", "ia3", "prefix", "prompt", "adapter")
SHARED = ("method", "modules_to_save")  # the keys every method has


@dataclass(init=False)
class MethodArguments:
    """How the pretrained model is made trainable: the method and the keys every method shares. Each method's own
    options are keys of its option dataclass; `MethodArguments(method="lora", lora_r=4)` routes them there, and
    `args.lora_r` reads them back (unset: None, the method's default)."""

    method: str = field(
        default="full", metadata={"help": "One of: " + ", ".join(BUILTIN_METHODS) + " (or a registered method)."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained and saved in full with a PEFT method (the head is always)."},
    )

    def __init__(self, method: str = "full", modules_to_save: list[str] | None = None, **options: Any) -> None:
        self.method, self.modules_to_save = method, modules_to_save
        self.__dict__["sections"] = {}  # option dataclass -> its instance (the parsed sections of the config)
        by_class: dict[type, dict[str, Any]] = {}
        for key, value in options.items():
            owner = _option_class(key)
            if owner is None:
                raise TypeError(f"MethodArguments got an unexpected keyword argument {key!r}")
            by_class.setdefault(owner, {})[key] = value
        self.set_sections([cls(**values) for cls, values in by_class.items()])

    def set_sections(self, parts: list[Any]) -> None:
        """Attach parsed option sections and check that no option of another method is set."""
        self.sections.update({type(part): part for part in parts})
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a method option, from its section (None when not given)
        sections = self.__dict__.get("sections")
        owner = _option_class(name) if sections is not None else None
        if owner is None:
            raise AttributeError(name)
        return getattr(sections[owner], name) if owner in sections else None

    def options_of(self, spec: MethodSpec) -> list[Any]:
        """The option sections a method reads (its defaults where none was parsed)."""
        return [self.sections.get(cls) or cls() for cls in spec.arguments]

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class MethodSpec:
    """A method and its traits."""

    name: str
    builder: str | Callable[..., Any]  # "module:function" (imported when a run is built), or the function itself
    summary: str  # what trains, for `--help` and the README's table
    arguments: tuple[type, ...] = ()  # its option dataclass(es): flat keys prefixed with the method's name
    peft: bool = True  # saved as a PEFT adapter (adapter_config.json) next to the base model
    mergeable: bool = False  # its weights fold into the base weights for serving (merge_and_unload)
    virtual_tokens: Callable[[Any], int] | None = None  # positions put in front of the input, from MethodArguments
    gradient_checkpointing: bool = True
    # PEFT prompt learning (prefixes / virtual tokens): it reads hidden_size / num_layers from the model config.
    prompt_learning: bool = False
    needs: frozenset[str] = frozenset()  # what a task must offer (e.g. "encoder": an encoder with a head)
    architectures: tuple[str, ...] | None = None  # the model types it knows how to place itself in (None: any)
    # "module:function" (model, MethodArguments, resume_from) -> Trainer callbacks (AdaLoRA's budget schedule)
    callbacks: str | Callable[..., list] | None = None
    checkpoint_files: tuple[str, ...] = ()  # what a resumable checkpoint holds besides Trainer's own files
    # "module:function" that teaches PEFT this adapter type, for an adapter type PEFT does not ship (None: PEFT's own);
    # a saved run loads with plain PEFT after that one call (the Hub card says so).
    peft_registration: str | None = None
    options: tuple[str, ...] = ()  # the keys it owns: filled from `arguments`

    def __post_init__(self) -> None:
        arguments = self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)
        object.__setattr__(self, "arguments", arguments)
        object.__setattr__(self, "options", tuple(f.name for cls in arguments for f in dataclasses.fields(cls)))

    def build(self, model, args, ctx):
        return _resolve(self.builder)(model, args, ctx)

    def trainer_callbacks(self, model, args, resume_from: str | None = None) -> list:
        return list(_resolve(self.callbacks)(model, args, resume_from)) if self.callbacks else []

    def supports(self, task: str) -> bool:
        from querytune.tasks import offers_of

        return self.needs <= offers_of(task)

    def num_virtual_tokens(self, args) -> int:
        return self.virtual_tokens(args) if self.virtual_tokens else 0


def _resolve(target: str | Callable) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def or_default(value, default):
    """An option's value, or the method's default where it is unset (None)."""
    return default if value is None else value


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method. Its option keys must be new, or belong to the same dataclass as another method's (AdaLoRA reads
    LoRA's)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    for cls in spec.arguments:
        for f in dataclasses.fields(cls):
            owner = _option_class(f.name)
            if f.name in SHARED or (owner is not None and owner is not cls):
                raise ValueError(
                    f"method {spec.name!r}: option {f.name!r} is already a key of {owner or 'every method'}"
                )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def option_classes() -> list[type]:
    """Every registered method's option dataclasses, once each (the config's method sections)."""
    return list(dict.fromkeys(cls for spec in _REGISTRY.values() for cls in spec.arguments))


def _option_class(key: str) -> type | None:
    return next((cls for cls in option_classes() if key in {f.name for f in dataclasses.fields(cls)}), None)


def option_owners(option: str) -> tuple[str, ...]:
    return tuple(spec.name for spec in _REGISTRY.values() if option in spec.options)


def options_of_other_methods(args) -> list[str]:
    """The options set in `args` that its method does not own (what `check_options` refuses)."""
    spec = get_method(args.method)
    return [f.name for cls, part in args.sections.items() for f in dataclasses.fields(cls)
            if f.name not in spec.options and getattr(part, f.name) is not None]  # fmt: skip


def check_options(args) -> None:
    """The method exists and no option of another method is set (e.g. `lora_r` left in a `method: prefix` file)."""
    for name in options_of_other_methods(args)[:1]:
        owners = option_owners(name)
        raise ValueError(f"{name} is set but method is {args.method!r} ({name} is for {owners or 'no method'})")


def check_supports(method: str, task: str) -> None:
    """A method that needs what the task does not offer (freezing the body of a generator) is an error."""
    spec = get_method(method)
    if not spec.supports(task):
        from querytune.tasks import offers_of

        raise ValueError(f"method {method!r} does not support task {task!r} (it needs a task offering "
                         f"{sorted(spec.needs)}; {task} offers {sorted(offers_of(task)) or 'nothing it needs'})")  # fmt: skip
