"""shardline's benchmark: the 3-rank pipeline against single-process transformers (python -m bench)."""
