"""Split a causal LM into per-stage safetensors shards plus a manifest (``python -m splitter``)."""
