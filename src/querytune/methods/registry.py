"""One record per method: everything the rest of querytune needs to know about it, in one place.

`MethodArguments` holds every method's options as flat, prefixed fields (`lora_r`, `prefix_num_virtual_tokens`,
...) so that sweeps and flags reach them. A method is a builder `(model, MethodArguments, MethodContext) -> model`
plus its traits: the option fields it owns,
whether it goes through PEFT, whether its weights fold into the base model, how many virtual tokens it puts in front
of the input, whether it works with gradient checkpointing, the tasks it supports and the Trainer callbacks it needs.
Nothing outside this module compares method names: code asks `get_method(name).mergeable` and so on.

Adding a method is one `register_method(MethodSpec(...))` call (see CONTRIBUTING.md); its options are fields of
`MethodArguments` (flat and prefixed, so that sweeps and flags reach them) or none at all.

This module is cheap to import (no torch, transformers or peft): config parsing uses it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The methods querytune ships (their records are at the end of this module); for the help text.
BUILTIN_METHODS = ("full", "freeze", "lora", "adalora", "ia3", "prefix", "prompt", "adapter")


@dataclass
class MethodArguments:
    """How the pretrained model is made trainable. Fields are flat and prefixed so sweeps can reach them.

    Unset (null) fields take the method's default when the method is built; setting a field of another method is
    an error.
    """

    method: str = field(
        default="full", metadata={"help": "One of: " + ", ".join(BUILTIN_METHODS) + " (or a registered method)."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained and saved in full with a PEFT method (the head is always)."},
    )
    # freeze
    freeze_trainable_layers: int | None = field(
        default=None, metadata={"help": "freeze: train only the top N encoder layers plus the head (default 2)."}
    )
    # LoRA / AdaLoRA
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha, usually 2 x r (default 16)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA path (default 0.1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: PEFT's per-architecture map)."}
    )
    lora_use_dora: bool | None = field(default=None, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    lora_use_rslora: bool | None = field(default=None, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})
    adalora_init_r: int | None = field(default=None, metadata={"help": "AdaLoRA initial rank per matrix (12)."})
    adalora_target_r: int | None = field(default=None, metadata={"help": "AdaLoRA average final rank (4)."})
    adalora_tinit: float | None = field(
        default=None, metadata={"help": "Warm-up before pruning: steps, or a fraction of total steps (0.1)."}
    )
    adalora_tfinal: float | None = field(
        default=None, metadata={"help": "Final fine-tuning steps at the target budget, or a fraction (0.2)."}
    )
    adalora_delta_t: int | None = field(default=None, metadata={"help": "Steps between budget allocations (10)."})
    adalora_orth_reg_weight: float | None = field(default=None, metadata={"help": "Orthogonal regulariser (0.5)."})
    # IA3
    ia3_target_modules: list[str] | None = field(default=None, metadata={"help": "IA3 target modules."})
    ia3_feedforward_modules: list[str] | None = field(default=None, metadata={"help": "IA3 feed-forward modules."})
    # Prefix tuning
    prefix_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Prefix length (default 20)."})
    prefix_projection: bool | None = field(
        default=None, metadata={"help": "Reparameterise the prefix through an MLP (default false)."}
    )
    prefix_encoder_hidden_size: int | None = field(default=None, metadata={"help": "MLP width with projection."})
    # Prompt tuning
    prompt_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Soft prompt length (20)."})
    prompt_init: str | None = field(default=None, metadata={"help": "'random' (default) or 'text'."})
    prompt_init_text: str | None = field(default=None, metadata={"help": "Text to initialise the prompt from."})
    # Bottleneck adapters (querytune.methods.bottleneck)
    adapter_variant: str | None = field(default=None, metadata={"help": "'houlsby' (default) or 'pfeiffer'."})
    adapter_reduction_factor: int | None = field(default=None, metadata={"help": "hidden / bottleneck (16)."})
    adapter_bottleneck_size: int | None = field(default=None, metadata={"help": "Explicit bottleneck width."})
    adapter_non_linearity: str | None = field(default=None, metadata={"help": "relu (default), gelu, silu, tanh."})
    adapter_target_modules: list[str] | None = field(default=None, metadata={"help": "Override the default map."})

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class MethodSpec:
    """A method and its traits."""

    name: str
    builder: str | Callable[..., Any]  # "module:function" (imported when a run is built), or the function itself
    summary: str  # what trains, for `--help` and the README's table
    options: tuple[str, ...] = ()  # the MethodArguments fields that belong to this method
    peft: bool = True  # saved as a PEFT adapter (adapter_config.json) next to the base model
    mergeable: bool = False  # its weights fold into the base weights for serving (merge_and_unload)
    virtual_tokens: Callable[[Any], int] | None = None  # positions put in front of the input, from MethodArguments
    gradient_checkpointing: bool = True
    # PEFT prompt learning (prefixes / virtual tokens): it reads hidden_size / num_layers from the model config.
    prompt_learning: bool = False
    tasks: frozenset[str] | None = None  # the tasks it can train; None: every task
    callbacks: str | Callable[..., list] | None = None  # "module:function" (model, MethodArguments) -> callbacks
    # "module:function" that teaches PEFT this adapter type, for an adapter type PEFT does not ship (None: PEFT's own);
    # a saved run loads with plain PEFT after that one call (the Hub card says so).
    peft_registration: str | None = None

    def build(self, model, args, ctx):
        return _resolve(self.builder)(model, args, ctx)

    def trainer_callbacks(self, model, args) -> list:
        return list(_resolve(self.callbacks)(model, args)) if self.callbacks else []

    def supports(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def num_virtual_tokens(self, args) -> int:
        return self.virtual_tokens(args) if self.virtual_tokens else 0


def _resolve(target: str | Callable) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _or(value, default):
    return default if value is None else value


_LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_use_dora", "lora_use_rslora")
# Tasks with an encoder and a head: what freezing the body and bottleneck adapters assume (not generation).
_ENCODER_TASKS = frozenset({"intent", "text_classification", "slots", "intent_slots", "rerank", "retrieval"})
_BUILDERS = "querytune.methods.builders"

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method; its options must be MethodArguments fields."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    known = {f.name for f in dataclasses.fields(MethodArguments)}
    unknown = [o for o in spec.options if o not in known]
    if unknown:
        raise ValueError(f"method {spec.name!r}: options {unknown} are not MethodArguments fields")
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


def option_owners(option: str) -> tuple[str, ...]:
    return tuple(spec.name for spec in _REGISTRY.values() if option in spec.options)


def check_options(args) -> None:
    """The method exists and no option of another method is set (e.g. `lora_r` left in a `method: prefix` file)."""
    spec = get_method(args.method)
    for f in dataclasses.fields(args):
        if f.name in ("method", "modules_to_save") or getattr(args, f.name) is None or f.name in spec.options:
            continue
        owners = option_owners(f.name)
        raise ValueError(f"{f.name} is set but method is {args.method!r} ({f.name} is for {owners or 'no method'})")
    if args.prompt_init is not None and args.prompt_init not in ("random", "text"):
        raise ValueError(f"prompt_init must be 'random' or 'text', got {args.prompt_init!r}")
    if args.prompt_init == "text" and not args.prompt_init_text:
        raise ValueError("prompt_init is 'text' but prompt_init_text is empty")


def options_of_other_methods(args) -> list[str]:
    """The options set in `args` that its method does not own (what `check_options` refuses)."""
    spec = get_method(args.method)
    return [f.name for f in dataclasses.fields(args)
            if f.name not in ("method", "modules_to_save", *spec.options) and getattr(args, f.name) is not None]  # fmt: skip


for _spec in (
    MethodSpec("full", f"{_BUILDERS}:build_full", "everything", peft=False),
    MethodSpec("freeze", f"{_BUILDERS}:build_freeze", "top N layers + head", options=("freeze_trainable_layers",),
               peft=False, tasks=_ENCODER_TASKS),
    MethodSpec("lora", f"{_BUILDERS}:build_lora", "low-rank updates", options=_LORA, mergeable=True),
    MethodSpec("adalora", f"{_BUILDERS}:build_adalora", "LoRA with a rank budget pruned during training",
               options=(*_LORA, "adalora_init_r", "adalora_target_r", "adalora_tinit", "adalora_tfinal",
                        "adalora_delta_t", "adalora_orth_reg_weight"),
               mergeable=True, callbacks=f"{_BUILDERS}:adalora_callbacks"),
    MethodSpec("ia3", f"{_BUILDERS}:build_ia3", "scaling vectors", options=("ia3_target_modules",
               "ia3_feedforward_modules"), mergeable=True),
    MethodSpec("prefix", f"{_BUILDERS}:build_prefix", "key/value prefixes per layer",
               options=("prefix_num_virtual_tokens", "prefix_projection", "prefix_encoder_hidden_size"),
               gradient_checkpointing=False, prompt_learning=True),
    MethodSpec("prompt", f"{_BUILDERS}:build_prompt", "soft prompt at the input",
               options=("prompt_num_virtual_tokens", "prompt_init", "prompt_init_text"),
               virtual_tokens=lambda args: _or(args.prompt_num_virtual_tokens, 20), gradient_checkpointing=False,
               prompt_learning=True),
    MethodSpec("adapter", f"{_BUILDERS}:build_adapter", "Houlsby / Pfeiffer bottleneck adapters",
               options=("adapter_variant", "adapter_reduction_factor", "adapter_bottleneck_size",
                        "adapter_non_linearity", "adapter_target_modules"), tasks=_ENCODER_TASKS,
               peft_registration="querytune.methods:register_bottleneck"),
):  # fmt: skip
    register_method(_spec)
