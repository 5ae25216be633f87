"""Methods: how a pretrained model is made trainable (full fine-tuning, freezing, and the PEFT methods).

`registry` holds one record per method (cheap to import); `builders` builds them (imports peft); `bottleneck` is
querytune's Houlsby / Pfeiffer adapter, registered with PEFT by `register_bottleneck()`.
"""

from querytune.methods.registry import MethodArguments, MethodSpec, get_method, method_names, methods, register_method

__all__ = ["MethodArguments", "MethodSpec", "get_method", "method_names", "methods", "register_bottleneck",
           "register_method"]  # fmt: skip


def register_bottleneck() -> None:
    """Make PEFT know querytune's bottleneck adapters (`"peft_type": "BOTTLENECK"`), so that a saved adapter loads
    with plain `peft.PeftModel.from_pretrained` / `AutoPeftModel*.from_pretrained`. Idempotent."""
    import querytune.methods.bottleneck  # noqa: F401  (registers on import)
