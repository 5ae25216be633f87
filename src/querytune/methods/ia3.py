"""IA3 (learned scaling vectors), through PEFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from querytune.methods.registry import MethodSpec, register_method

# (target, feed-forward) modules for architectures missing from PEFT's own map, and for BERT2BERT warm starts.
EXTRA_IA3_TARGETS = {"mpnet": (["k", "v", "output.dense"], ["output.dense"]),
                     "encoder-decoder": (["key", "value", "output.dense"], ["output.dense"])}  # fmt: skip


@dataclass
class Ia3Arguments:
    """Options of `ia3`."""

    ia3_target_modules: list[str] | None = field(default=None, metadata={"help": "IA3 target modules."})
    ia3_feedforward_modules: list[str] | None = field(default=None, metadata={"help": "IA3 feed-forward modules."})


def build_ia3(model, args, ctx):
    import peft

    from querytune.methods.builders import modules_to_save

    targets, feedforward = args.ia3_target_modules, args.ia3_feedforward_modules
    if targets is None and model.config.model_type in EXTRA_IA3_TARGETS:
        targets, feedforward = EXTRA_IA3_TARGETS[model.config.model_type]
    config = peft.IA3Config(
        task_type=ctx.task_type,
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


register_method(MethodSpec("ia3", build_ia3, "scaling vectors", Ia3Arguments, mergeable=True))
