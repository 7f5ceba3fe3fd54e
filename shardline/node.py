"""Start-up on every rank: MPI (or none with one process), shard checks, loading, and the roll call.

Each rank checks and loads only its own shard, then all ranks report to rank 0 in one Gather of
fixed-size JSON records (upper-case, no pickle). Rank 0 prints every problem and broadcasts go or
no-go, so a bad shard on any board stops the whole job with a message naming the file and the fix.
"""
from __future__ import annotations

import json
import socket
import sys
import time

import numpy as np

from shardline import omp
from shardline.manifest import FIX_DISTRIBUTE, ShardError, check_world, load_manifest, verify_shard, verify_tokenizer
from shardline.metrics import release_free_heap, rss_bytes
from shardline.stage import load_stage as load_family_stage

RECORD = 4096  # bytes per rank in the roll call


def init_dist():
    """(comm, rank, size); comm is None for a plain `python main.py` (one rank, no MPI at all)."""
    if not omp.launched():
        return None, 0, 1
    import mpi4py
    # one thread at a time: the loop thread, or a wire.Keepalive while the loop computes or starts (Link.lock)
    mpi4py.rc.thread_level = "serialized"
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def load_stage(model_dir, rank: int, size: int, slots: int, max_context: int | None, device: str | None = "auto",
               wire_dtype: str = "float32", load_tokenizer=None):
    """Check and load this rank's shard. Returns (stage, manifest, tokenizer_dir, tokenizer, record), the
    tokenizer's only on rank 0: load_tokenizer(tokenizer_dir) runs before the shard is read, since
    parsing tokenizer.json peaks 28 MiB above what it keeps (SmolLM2's) and that is released first, so
    the rank's peak does not hold both."""
    host = socket.gethostname()
    record = {"rank": rank, "host": host, "ok": False, "wire_dtype": wire_dtype}
    try:
        from shardline.models.linear import fp32_matmul
        from shardline.wire import idle_policy
        record["fp32_matmul"] = fp32_matmul()
        record["idle_policy"] = idle_policy()
    except ValueError as err:   # a bad SHARDLINE_FP32_MATMUL or SHARDLINE_IDLE_POLICY on this board
        record["error"] = str(err)
        return None, None, None, None, record
    try:
        manifest = load_manifest(model_dir)
        record["split_id"] = manifest.data.get("split_id")
        check_world(manifest, size)
        entry = manifest.stage(rank)
        record["layers"] = entry["layers"]
        path = verify_shard(manifest, rank)
        tok_dir = verify_tokenizer(manifest) if rank == 0 else None
        tokenizer = None
        if tok_dir is not None and load_tokenizer is not None:
            tokenizer = load_tokenizer(tok_dir)
            release_free_heap()
        t0 = time.time()
        stage = load_family_stage(manifest, rank, path, slots, max_context, device)
        release_free_heap()
        rss, peak = rss_bytes()
        record.update(ok=True, load_seconds=round(time.time() - t0, 2), rss_mb=round(rss / 2**20, 1),
                      shard_mb=round(entry["bytes"] / 2**20, 1), device=str(stage.device),
                      slots=slots, max_context=stage.max_context)
        return stage, manifest, tok_dir, tokenizer, record
    except ShardError as err:
        record["error"] = str(err)
    except Exception as err:  # a broken file safetensors cannot parse, or a bad config
        record["error"] = f"{model_dir}: rank {rank} could not load its shard: {type(err).__name__}: {err}"
    return None, None, None, None, record


def roll_call(comm, rank: int, size: int, record: dict) -> tuple[bool, list[dict] | None]:
    """Gather every rank's record on rank 0 (returned there); every rank learns go or no-go."""
    if comm is None:
        records = [record]
    else:
        buf = np.zeros(RECORD, np.uint8)
        raw = _fit(record)
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        allbuf = np.zeros((size, RECORD), np.uint8) if rank == 0 else None
        _wait(comm.Igather(buf, allbuf, root=0))
        records = ([json.loads(bytes(row).rstrip(b"\0") or b"{}") for row in allbuf] if rank == 0 else None)
    go = np.array([1], np.uint8)
    if rank == 0:
        # Every rank must send and expect the hidden state in the same type, and hold the same KV-cache
        # rows (rank 0 hands out slot numbers and positions; a smaller cache elsewhere broke mid-request).
        for r in records[1:] if records[0].get("ok") else []:
            # Each rank checked its shard against its own manifest: a board left with another split's
            # (a redistribution that missed it, the same number of stages) would pass that and compute
            # other layers, or the same ones twice, in silence.
            if r.get("ok") and r.get("split_id") != records[0].get("split_id"):
                r.update(ok=False, error=f"holds split {r.get('split_id')} (layers {r.get('layers')}) but rank 0 "
                         f"split {records[0].get('split_id')}: the boards hold different splits; {FIX_DISTRIBUTE}")
                continue
            differ = [(option, r.get(key), records[0].get(key)) for key, option in
                      (("wire_dtype", "--wire-dtype"), ("slots", "--slots"), ("max_context", "--max-context"))
                      if r.get(key) != records[0].get(key)]
            if r.get("ok") and differ:
                r.update(ok=False, error="started with " + ", ".join(f"{o} {mine}" for o, mine, _ in differ) +
                         " but rank 0 with " + ", ".join(f"{o} {head}" for o, _, head in differ) +
                         "; start every rank with the same " + " and ".join(o for o, _, _ in differ))
        bad = [r for r in records if not r.get("ok")]
        for r in bad:
            print(f"shardline: rank {r.get('rank')} on {r.get('host')}: {r.get('error')}", file=sys.stderr, flush=True)
        go[0] = 0 if bad else 1
    if comm is not None:
        _wait(comm.Ibcast(go, root=0))
    return bool(go[0]), records


def _fit(record: dict) -> bytes:
    """The record as JSON in at most RECORD bytes: a long error message is cut (cutting the JSON itself
    made rank 0's parse fail, and the others wait in the roll call for good)."""
    raw = json.dumps(record).encode()
    error = record.get("error") or ""
    if len(raw) > RECORD and error:
        lo, hi = 0, len(error)             # the longest start of the message that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(json.dumps(dict(record, error=error[:mid] + " [...]")).encode()) <= RECORD:
                lo = mid
            else:
                hi = mid - 1
        raw = json.dumps(dict(record, error=error[:lo] + " [...]")).encode()
    if len(raw) > RECORD:
        raw = json.dumps({k: record.get(k) for k in ("rank", "host", "ok")} | {"error": "record too long"}).encode()
    return raw


def _wait(request) -> None:
    """Wait for a non-blocking collective, asleep: Open MPI's blocking ones poll without pause, so ranks
    that loaded first spun a core each, which the ranks still loading on the same host needed."""
    while not request.Test():
        time.sleep(0.05)


class Node:
    """This rank after a successful start: its place in the ring and its loaded stage."""

    def __init__(self, comm, rank, size, stage, manifest, tok_dir, records, tokenizer=None):
        from shardline import wire
        self.comm, self.rank, self.size = comm, rank, size
        self.stage, self.manifest, self.tok_dir, self.records = stage, manifest, tok_dir, records
        self.tokenizer = tokenizer
        self.link = wire.Link(comm, prev=(rank - 1) % size, next=(rank + 1) % size) if size > 1 else None


def start(model_dir, slots: int, max_context: int | None = None, threads: int | None = None,
          microbatches: int | None = None, device: str | None = "auto", wire_dtype: str = "float32",
          load_tokenizer=None) -> Node | None:
    """Every rank: join MPI, check and load its own shard, and take part in the roll call.
    Returns None (after rank 0 has printed why) when any rank cannot serve. threads: torch's thread
    count (main.py has omp.configure choose it; else omp.default_threads)."""
    comm, rank, size = init_dist()
    import torch
    torch.set_num_threads(threads or omp.default_threads(size, microbatches))
    stage, manifest, tok_dir, tokenizer, record = load_stage(model_dir, rank, size, slots, max_context, device,
                                                             wire_dtype, load_tokenizer)
    omp.Threads().idle()     # loading ran parallel regions: end their threads, which spin (ACTIVE) otherwise
    go, records = roll_call(comm, rank, size, record)
    return Node(comm, rank, size, stage, manifest, tok_dir, records, tokenizer) if go else None
