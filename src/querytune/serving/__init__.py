"""Putting runs to work next to a search engine: `export` (merged / ONNX / int8, verified) and `api` (HTTP)."""
