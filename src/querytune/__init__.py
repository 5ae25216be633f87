"""querytune: fine-tune pretrained language models for search-query understanding.

Importing the package is cheap (no torch, transformers or peft): the command line answers `--help` at once, and
the heavy libraries load only where a run is built or loaded. Users of plain PEFT who load a bottleneck-adapter
run without querytune's loaders call `querytune.methods.register_bottleneck()` first.
"""

__version__ = "0.1.0"
