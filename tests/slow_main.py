"""main.py with some ranks' steps made slow, as a board far slower than this host makes them:

    SHARDLINE_TEST_SLOW="RANKS:SECONDS:MIN_TOKENS" mpirun ... python -m mpi4py tests/slow_main.py ARGS

e.g. "1,2:3:20": on ranks 1 and 2, every micro-batch of at least 20 tokens (a prompt chunk, not a
decode step) takes 3 s longer. The delay is a sleep, which releases the GIL as torch's kernels do, so
the rank's other threads run meanwhile as they would beside a long matmul.

SHARDLINE_TEST_SLOW_LOAD="RANK:SECONDS": that rank takes SECONDS longer to load its shard, as a board
reading it from a slow SD card does, while the others wait in the roll call.

SHARDLINE_TEST_SLOW_START="SECONDS": rank 0 takes SECONDS longer to start its HTTP server after the roll
call, as a busy head board importing FastAPI does.

SHARDLINE_TEST_ROLL_CALL_MARKS="DIR": each rank creates DIR/rank<N> as it enters the roll call, so a test
can tell the ranks that have loaded and wait from those still starting."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardline import omp


def slow_load() -> None:
    rank, seconds = os.environ["SHARDLINE_TEST_SLOW_LOAD"].split(":")
    if omp.world_rank() != int(rank):
        return
    from shardline import node
    load = node.load_family_stage

    def slow(*args, **kwargs):
        time.sleep(float(seconds))
        return load(*args, **kwargs)
    node.load_family_stage = slow


def mark_roll_call() -> None:
    marks = Path(os.environ["SHARDLINE_TEST_ROLL_CALL_MARKS"])
    from shardline import node
    roll_call = node.roll_call

    def marked(comm, rank, size, record, watch=None):
        (marks / f"rank{rank}").touch()
        return roll_call(comm, rank, size, record, watch)
    node.roll_call = marked


def slow_down() -> None:
    ranks, seconds, min_tokens = os.environ["SHARDLINE_TEST_SLOW"].split(":")
    if omp.world_rank() not in {int(r) for r in ranks.split(",")}:
        return
    from shardline.models import gpt2, llama
    for module in (gpt2, llama):
        forward = module.Stage.forward

        def slow(self, x, seqs, forward=forward):
            if x.shape[0] >= int(min_tokens):
                time.sleep(float(seconds))
            return forward(self, x, seqs)
        module.Stage.forward = slow


def slow_start() -> None:
    seconds = float(os.environ["SHARDLINE_TEST_SLOW_START"])
    from shardline import api
    create_app = api.create_app

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return create_app(*args, **kwargs)
    api.create_app = slow


if __name__ == "__main__":
    import runpy
    if "SHARDLINE_TEST_SLOW" in os.environ:
        slow_down()
    if "SHARDLINE_TEST_SLOW_LOAD" in os.environ:
        slow_load()
    if "SHARDLINE_TEST_SLOW_START" in os.environ:
        slow_start()
    if "SHARDLINE_TEST_ROLL_CALL_MARKS" in os.environ:
        mark_roll_call()
    sys.argv[0] = str(Path(__file__).resolve().parents[1] / "main.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
