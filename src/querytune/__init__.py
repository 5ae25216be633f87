"""querytune: fine-tune pretrained language models for search-query understanding."""

__version__ = "0.1.0"
