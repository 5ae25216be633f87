"""PEFT prompt learning: prefix tuning (key/value prefixes in every layer) and prompt tuning (a soft prompt at the
input). Neither merges into the base weights, and neither works with gradient checkpointing."""

from __future__ import annotations

from dataclasses import dataclass, field

from querytune.methods.registry import MethodSpec, or_default, register_method


@dataclass
class PrefixArguments:
    """Options of `prefix`."""

    prefix_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Prefix length (default 20)."})
    prefix_projection: bool | None = field(
        default=None, metadata={"help": "Reparameterise the prefix through an MLP (default false)."}
    )
    prefix_encoder_hidden_size: int | None = field(default=None, metadata={"help": "MLP width with projection."})


@dataclass
class PromptArguments:
    """Options of `prompt`."""

    prompt_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Soft prompt length (20)."})
    prompt_init: str | None = field(default=None, metadata={"help": "'random' (default) or 'text'."})
    prompt_init_text: str | None = field(default=None, metadata={"help": "Text to initialise the prompt from."})

    def __post_init__(self) -> None:
        if self.prompt_init is not None and self.prompt_init not in ("random", "text"):
            raise ValueError(f"prompt_init must be 'random' or 'text', got {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ValueError("prompt_init is 'text' but prompt_init_text is empty")


def build_prefix(model, args, ctx):
    import inspect

    import peft

    from querytune.methods.builders import modules_to_save

    # PEFT only finds out at the first forward pass; fail before training starts instead.
    takes_cache = (inspect.signature(m.forward).parameters for m in (model, model.base_model))
    if not any("past_key_values" in params for params in takes_cache):
        raise ValueError(
            f"{model.config.model_type} attention takes no past_key_values, which prefix tuning needs; "
            "use lora, ia3, adapter or prompt"
        )
    config = peft.PrefixTuningConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=or_default(args.prefix_num_virtual_tokens, 20),
        prefix_projection=or_default(args.prefix_projection, False),
        encoder_hidden_size=or_default(args.prefix_encoder_hidden_size, model.config.hidden_size),
        modules_to_save=modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def prompt_length(args) -> int:
    return or_default(args.prompt_num_virtual_tokens, 20)


def build_prompt(model, args, ctx):
    import peft

    from querytune.methods.builders import modules_to_save

    from_text = or_default(args.prompt_init, "random") == "text"
    config = peft.PromptTuningConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=prompt_length(args),
        prompt_tuning_init=peft.PromptTuningInit.TEXT if from_text else peft.PromptTuningInit.RANDOM,
        prompt_tuning_init_text=args.prompt_init_text if from_text else None,
        tokenizer_name_or_path=ctx.tokenizer_name_or_path if from_text else None,
        modules_to_save=modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


register_method(MethodSpec("prefix", build_prefix, "key/value prefixes per layer", PrefixArguments,
                           gradient_checkpointing=False, prompt_learning=True))  # fmt: skip
register_method(MethodSpec("prompt", build_prompt, "soft prompt at the input", PromptArguments,
                           virtual_tokens=prompt_length, gradient_checkpointing=False, prompt_learning=True))  # fmt: skip
