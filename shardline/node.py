"""Start-up on every rank: MPI (or none with one process), shard checks, loading, and the roll call.

Each rank checks and loads only its own shard, then all ranks report to rank 0 in one Gather of
fixed-size JSON records (upper-case, no pickle). Rank 0 prints every problem and broadcasts go or
no-go, so a bad shard on any board stops the whole job with a message naming the file and the fix.
While they load, the ranks exchange signs of life (LoadWatch), so one that dies meanwhile (the OOM
killer on a board its shard does not fit) ends the start in --load-silence seconds, naming it.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time

import numpy as np

from shardline import omp
from shardline.manifest import FIX_DISTRIBUTE, ShardError, check_world, load_manifest, verify_shard, verify_tokenizer
from shardline.metrics import release_free_heap, rss_bytes
from shardline.stage import load_stage as load_family_stage

RECORD = 4096  # bytes per rank in the roll call
LOAD_TAG = 13  # signs of life while loading (wire.py's ring uses 11 and 12)
BEAT, LAST = 1, 2  # a sign of life; the last one (this rank is past the roll call)
BEAT_BYTES = 64  # kind, then the sender's host name
BEAT_SECONDS = 0.5  # fixed, not derived from --load-silence: ranks started with different limits still agree


def init_dist():
    """(comm, rank, size); comm is None for a plain `python main.py` (one rank, no MPI at all)."""
    if not omp.launched():
        return None, 0, 1
    import mpi4py
    # one thread at a time: the loop thread, or a wire.Keepalive while the loop computes or starts (Link.lock)
    mpi4py.rc.thread_level = "serialized"
    from mpi4py import MPI

    from shardline.wire import ulfm_on
    ulfm_on()   # asked now, while no peer can fail, and kept for the rank's end (main.main)
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


class LoadWatch:
    """Signs of life while the ranks load their shards, which takes seconds to minutes per board. A
    rank that dies meanwhile (the OOM killer, on a board its shard does not fit; a segfault) sends
    nothing more, and mpirun keeps the job up (--enable-recovery), so the others waited in the roll
    call for good, or for the supervisor's --start-timeout (600 s).

    Each worker sends rank 0 a beat every BEAT_SECONDS, and rank 0 one to every worker, from a thread
    while the main thread hashes and reads the shard (torch's copies and hashlib release the GIL), then
    from the roll call's waits, through its broadcast: a rank that has loaded and waits there can still
    die (the OOM killer picks the largest process, which may be a loaded rank beside one still loading).
    A rank that has heard nothing from a peer for `limit` seconds calls on_silent(message). A slow
    board is not a dead one: its thread beats on meanwhile. MPI is serialized (one thread at a time):
    the thread runs only while the main thread makes no MPI call, from start() until pause(). Rank 0
    hears every worker, a worker hears rank 0 only; after the roll call each rank sends LAST and takes
    its peers' beats up to theirs, so none is left unreceived for a later receive to meet (they have a
    tag of their own, LOAD_TAG, besides). An MPI error here (a peer's TCP link gone) ends the start
    through on_silent as well, never silently in the thread."""

    def __init__(self, comm, rank: int, size: int, limit: float, on_silent, beat: float = BEAT_SECONDS):
        from mpi4py import MPI
        self.MPI, self.comm, self.rank, self.limit, self.on_silent = MPI, comm, rank, limit, on_silent
        self.beat = beat
        self.peers = list(range(1, size)) if rank == 0 else [0]
        now = time.monotonic()
        self.heard = {p: now for p in self.peers}        # MPI's start waits for every rank: all live now
        self.hosts: dict[int, str] = {}
        self.done: set[int] = set()                      # peers whose LAST has come
        self.ended = False                               # this rank has sent its LAST
        self.buf = np.zeros(BEAT_BYTES, np.uint8)
        self.status = MPI.Status()
        self.req = comm.Irecv(self.buf, source=MPI.ANY_SOURCE if rank == 0 else 0, tag=LOAD_TAG)
        self.sends: list = []
        self.next_beat = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="load-watch", daemon=True)

    def start(self) -> "LoadWatch":
        self.thread.start()
        return self

    def pause(self) -> None:
        """Stop the thread: the main thread polls from here on (it is about to make MPI calls)."""
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        try:
            while not self.stop.wait(0.05):
                self.poll()
        except Exception as err:  # noqa: BLE001 - the start cannot go on without the watch
            self.on_silent(f"the ranks' signs of life failed while they loaded: {type(err).__name__}: {err}")

    def poll(self) -> None:
        """Beat when due, take what peers sent, and call on_silent once a peer is silent too long."""
        now = time.monotonic()
        if not self.ended and now >= self.next_beat:
            self._send(BEAT)
            self.next_beat = now + self.beat
        try:
            self._receive()
        except self.MPI.Exception as err:   # the receive itself failed: a peer's process ended (ULFM)
            self.failed(err)
            return
        self._reap()
        silent = [p for p in self.peers if p not in self.done and time.monotonic() - self.heard[p] > self.limit]
        if silent:
            self.on_silent(self.describe(silent))

    def failed(self, err: Exception) -> None:
        """An MPI call of the start failed (ULFM: a rank's process ended; see wire.TCP_MCA): on_silent,
        naming the ranks MPI knows to have failed."""
        from shardline.wire import failed_ranks
        gone = [p for p in failed_ranks(self.comm) if p != self.rank]
        self.on_silent(self.describe(gone, died=True) if gone else
                       f"the ranks' signs of life failed while they loaded: {err}")

    def describe(self, silent: list[int], died: bool = False) -> str:
        """died: MPI reported these peers' processes failed (ULFM); else they are only silent."""
        who = ", ".join(f"rank {p} on {self.hosts[p]}" if p in self.hosts else f"rank {p}" for p in silent)
        oom = ("out of memory? run journalctl -k | grep -i oom on that board, and split again with its real free "
               "memory in python -m splitter --boards FILE")
        if died:
            return (f"{who} died while the ranks loaded their shards (MPI reports the process failed"
                    f"{'; ' + oom if self.rank == 0 else ''})")
        what = f"{who} sent no sign of life for {self.limit:.0f}s while the ranks loaded their shards"
        return f"{what}: it died ({oom}) or hangs (--load-silence)" if self.rank == 0 else f"{what}: it died or hangs"

    def _send(self, kind: int) -> None:
        msg = np.zeros(BEAT_BYTES, np.uint8)
        host = socket.gethostname().encode()[:BEAT_BYTES - 1]
        msg[0], msg[1:1 + len(host)] = kind, np.frombuffer(host, np.uint8)
        for p in self.peers:      # each listens until this rank's LAST, done loading or not itself
            try:
                self.sends.append(self.comm.Isend(msg, dest=p, tag=LOAD_TAG))
            except self.MPI.Exception:      # a TCP link to a peer that died: its silence will tell
                pass

    def _reap(self) -> None:
        from shardline.wire import unfinished
        self.sends = unfinished(self.sends, self.MPI.Exception)

    def _receive(self) -> None:
        while self.req is not None and self.req.Test(self.status):
            src = self.status.Get_source()
            self.heard[src] = time.monotonic()
            self.hosts[src] = bytes(self.buf[1:]).rstrip(b"\0").decode(errors="replace")
            if self.buf[0] == LAST:
                self.done.add(src)
            self.req = (None if self.done >= set(self.peers) else
                        self.comm.Irecv(self.buf, source=0 if self.rank else self.MPI.ANY_SOURCE,
                                        tag=LOAD_TAG))

    def close(self, timeout: float = 10.0) -> None:
        """After the roll call: this rank's LAST, then the peers' remaining beats up to theirs, and this
        rank's sends completed (bounded: a peer that died just now is the ring's to find)."""
        self._send(LAST)
        self.ended = True
        end = time.monotonic() + timeout
        try:
            while (self.req is not None or self.sends) and time.monotonic() < end:
                self._receive()
                self._reap()
                time.sleep(0.005)
            if self.req is not None:
                self.req.Cancel()
        except self.MPI.Exception:      # a peer gone meanwhile: the ring's heartbeat will tell
            pass


def roll_call(comm, rank: int, size: int, record: dict, watch: LoadWatch | None = None) -> tuple[bool, list[dict] | None]:
    """Gather every rank's record on rank 0 (returned there); every rank learns go or no-go. watch: the
    ranks' signs of life, polled while a rank waits here for those still loading."""
    if comm is None:
        records = [record]
    else:
        buf = np.zeros(RECORD, np.uint8)
        raw = _fit(record)
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        allbuf = np.zeros((size, RECORD), np.uint8) if rank == 0 else None
        _wait(comm.Igather(buf, allbuf, root=0), watch)
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
        _wait(comm.Ibcast(go, root=0), watch)
        if watch is not None:
            watch.close()
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


def _wait(request, watch: LoadWatch | None = None) -> None:
    """Wait for a non-blocking collective, asleep: Open MPI's blocking ones poll without pause, so ranks
    that loaded first spun a core each, which the ranks still loading on the same host needed."""
    while True:
        try:
            if request.Test():
                return
        except Exception as err:     # MPI's: a rank's process ended (ULFM) while the others waited for it
            if watch is not None:
                watch.failed(err)    # ends the process with a message naming it
            raise
        if watch is not None:
            watch.poll()
        time.sleep(0.05)


def _exit_silent(rank: int):
    def on_silent(message: str) -> None:
        print(f"[rank {rank} on {socket.gethostname()}] {message}: exiting", file=sys.stderr, flush=True)
        import os
        os._exit(1)
    return on_silent


class Node:
    """This rank after a successful start: its place in the ring and its loaded stage."""

    def __init__(self, comm, rank, size, stage, manifest, tok_dir, records, tokenizer=None):
        from shardline import wire
        self.comm, self.rank, self.size = comm, rank, size
        self.stage, self.manifest, self.tok_dir, self.records = stage, manifest, tok_dir, records
        self.tokenizer = tokenizer
        self.ring_closed = False    # set as it ends: the SHUTDOWN passed and every ring send of this rank completed
        self.link = (wire.Link(comm, prev=(rank - 1) % size, next=(rank + 1) % size, answers_probes=rank > 0)
                     if size > 1 else None)


def start(model_dir, slots: int, max_context: int | None = None, threads: int | None = None,
          microbatches: int | None = None, device: str | None = "auto", wire_dtype: str = "float32",
          load_tokenizer=None, load_silence: float = 60.0, on_silent=None) -> Node | None:
    """Every rank: join MPI, check and load its own shard, and take part in the roll call.
    Returns None (after rank 0 has printed why) when any rank cannot serve. threads: torch's thread
    count (main.py has omp.configure choose it; else omp.default_threads). on_silent(message): what
    this rank does once a peer has sent no sign of life for load_silence seconds while loading (it
    must end the process; by default the message is printed and the process exits with status 1)."""
    comm, rank, size = init_dist()
    watch = None if comm is None else LoadWatch(comm, rank, size, load_silence, on_silent or _exit_silent(rank)).start()
    try:
        import torch
        torch.set_num_threads(threads or omp.default_threads(size, microbatches))
        stage, manifest, tok_dir, tokenizer, record = load_stage(model_dir, rank, size, slots, max_context, device,
                                                                 wire_dtype, load_tokenizer)
        omp.Threads().idle()     # loading ran parallel regions: end their threads, which spin (ACTIVE) otherwise
    finally:
        if watch is not None:
            watch.pause()        # before any other MPI call, even on the way out (serialized)
    go, records = roll_call(comm, rank, size, record, watch)
    return Node(comm, rank, size, stage, manifest, tok_dir, records, tokenizer) if go else None
