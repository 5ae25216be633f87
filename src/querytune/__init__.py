"""querytune: fine-tune pretrained language models for search-query understanding."""

__version__ = "0.1.0"

# Registers the bottleneck adapter type with PEFT, so that a saved adapter folder loads with plain
# `peft.PeftModel.from_pretrained` in any process that has imported querytune.
from querytune import peft_adapter as _peft_adapter  # noqa: E402, F401
