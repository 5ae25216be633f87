"""Methods: how a pretrained model is made trainable (full fine-tuning, freezing, and the PEFT methods).

`registry` holds the records (cheap to import); one file per family defines a method's options, builder and record
(`full`, `lora`, `ia3`, `prompt_learning`, `adapter`), imported here in the order the methods are listed;
`builders` holds what every builder shares; `bottleneck` is querytune's Houlsby / Pfeiffer adapter as a PEFT
method, registered with PEFT by `register_bottleneck()`.
"""

# The built-in families register their methods on import, in this order.
from querytune.methods import full, lora, ia3, prompt_learning, adapter  # noqa: F401, I001  (order matters)
from querytune.methods.registry import MethodArguments, MethodSpec, get_method, method_names, methods, register_method

__all__ = ["MethodArguments", "MethodSpec", "get_method", "method_names", "methods", "register_bottleneck",
           "register_method"]  # fmt: skip


def register_bottleneck() -> None:
    """Make PEFT know querytune's bottleneck adapters (`"peft_type": "BOTTLENECK"`), so that a saved adapter loads
    with plain `peft.PeftModel.from_pretrained` / `AutoPeftModel*.from_pretrained`. Idempotent."""
    import querytune.methods.bottleneck  # noqa: F401  (registers on import)
