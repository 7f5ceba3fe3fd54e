"""shardline: what runs on a board (stage, wire protocol, engine, sampling, API, metrics)."""

EX_CONFIG = 78  # exit status of a refused start (bad shard, wrong rank count): restarting will not help
