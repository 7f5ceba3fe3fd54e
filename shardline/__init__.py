"""shardline: what runs on a board (stage, wire protocol, engine, sampling, API, metrics)."""
