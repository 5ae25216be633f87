"""Full fine-tuning, and freezing all but the top layers: the two methods that are not PEFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from querytune.methods.registry import MethodSpec, or_default, register_method


@dataclass
class FreezeArguments:
    """Options of `freeze`."""

    freeze_trainable_layers: int | None = field(
        default=None, metadata={"help": "freeze: train only the top N encoder layers plus the head (default 2)."}
    )


def build_full(model, args, ctx):
    return model


def encoder_layers(model):
    """The stack of transformer blocks (the longest ModuleList named `layer`/`layers`/`h`)."""
    from torch import nn

    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "h")
    ]
    if not candidates:
        raise ValueError(f"method 'freeze': cannot find the layer stack of {type(model).__name__}")
    return max(candidates, key=len)


def build_freeze(model, args, ctx):
    from querytune.methods.builders import modules_to_save

    layers = encoder_layers(model)
    n = or_default(args.freeze_trainable_layers, 2)
    if not 0 <= n <= len(layers):
        raise ValueError(f"freeze_trainable_layers must be in [0, {len(layers)}], got {n}")
    prefix = model.base_model_prefix + "."
    for name, param in model.named_parameters():
        # Everything outside the encoder body (the head) and the pooler feeding it stays trainable.
        param.requires_grad = not name.startswith(prefix) or ".pooler." in name
    for layer in list(layers)[len(layers) - n :]:
        layer.requires_grad_(True)
    for name in modules_to_save(args, ctx) or []:
        model.get_submodule(name).requires_grad_(True)
    return model


register_method(MethodSpec("full", build_full, "everything", peft=False))
# freezing the body assumes an encoder with a head (not a generator)
register_method(MethodSpec("freeze", build_freeze, "top N layers + head", FreezeArguments, peft=False,
                           needs=frozenset({"encoder"})))  # fmt: skip
