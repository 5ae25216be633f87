"""What every method builder shares: the context it is given, the modules every PEFT method trains and saves in
full, applying a method to a model, its Trainer callbacks, and merging a mergeable adapter into the base weights.

Each method's own builder lives in its family's file (`full`, `lora`, `ia3`, `prompt_learning`, `adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from querytune.methods.registry import get_method


@dataclass
class MethodContext:
    """What a method builder needs to know beyond its own options."""

    task_type: Any  # peft.TaskType
    new_modules: list[str] = field(default_factory=list)  # initialised from scratch: always trained and saved
    num_training_steps: int | None = None  # AdaLoRA's budget schedule needs it
    tokenizer_name_or_path: str | None = None  # prompt tuning initialised from text needs it


def modules_to_save(args: Any, ctx: MethodContext) -> list[str] | None:
    """The modules a PEFT method trains and saves in full: the ones the checkpoint lacked (the head) and any named."""
    modules = sorted(set(ctx.new_modules) | set(args.modules_to_save or []))
    return modules or None


def apply_method(model: nn.Module, args: Any, ctx: MethodContext) -> nn.Module:
    """Make `model` trainable with `args.method`; errors from PEFT are re-raised naming the method and model."""
    try:
        return get_method(args.method).build(model, args, ctx)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ValueError(
            f"method {args.method!r} cannot be applied to {type(model).__name__} ({model.config.model_type}): {err}"
        ) from err


def method_callbacks(model: nn.Module, args: Any, resume_from: str | None = None) -> list:
    """The Trainer callbacks the method needs (AdaLoRA's budget schedule), resuming from `resume_from`."""
    return get_method(args.method).trainer_callbacks(model, args, resume_from)


def merge_peft_model(model) -> nn.Module:
    """Fold the adapter into the base weights and return a plain transformers model (mergeable methods only).

    The trained copies of `modules_to_save` (the head) are put in place first: PEFT's IA3 unload tries to copy a
    `.weight` from each wrapper and fails on heads that are not a single Linear, e.g. RoBERTa's.
    """
    from peft.utils import ModulesToSaveWrapper

    inner = model.base_model.model
    adapter = model.active_adapter
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.modules_to_save[adapter])
    return model.merge_and_unload()
