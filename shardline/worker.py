"""A worker rank's loop: receive a micro-batch from prev, run this stage's blocks, send it on."""
from __future__ import annotations

import time

import numpy as np

from shardline import omp, wire, wiredtype
from shardline.metrics import rss_bytes
from shardline.stage import Stage


class Silence(Exception):
    """Nothing came from the previous rank for too long: rank 0's heartbeat stopped, so the job is broken."""


def serve(stage: Stage, link: wire.Link, rank: int, last: bool, should_stop, silence_timeout: float = 0,
          heartbeat: float = 2.0) -> bool:
    """Runs until rank 0's SHUTDOWN passes through, or should_stop() says the deadline to get one has gone.
    True when the SHUTDOWN passed and every ring send of this rank completed (the next rank has it), so
    that nothing is left for MPI_Finalize to push out.
    Raises Silence after silence_timeout seconds (0 = never) without a message: rank 0 sends a STATS
    heartbeat every `heartbeat` seconds (a PING while it computes a long step), so silence means a rank
    before this one, or its board, is dead or hung. While this rank computes a long step, a
    wire.Keepalive passes the heartbeat on."""
    done = {"compute": 0.0, "steps": 0}

    def with_row(msg: wire.Message) -> wire.Message:
        rss, peak = rss_bytes()
        row = [rank, done["compute"], link.bytes_sent, link.bytes_recv, done["steps"], rss, peak, keepalive.busy_for()]
        msg.payload = np.vstack([msg.payload, np.array([row], np.float64)])
        return msg

    keepalive = wire.Keepalive(link, heartbeat, on_stats=with_row)
    threads = omp.Threads()
    while True:
        msg = link.poll()
        if msg is None:
            threads.idle()
            link.reap()
            if should_stop():
                return False
            quiet = time.monotonic() - link.last_traffic
            if silence_timeout and quiet > silence_timeout:
                if link.incoming is not None:
                    raise Silence(f"a message from rank {link.prev} began to arrive {quiet:.0f}s ago and did not "
                                  "finish: its board went in the middle of it, or the link is too slow for "
                                  "--step-timeout")
                raise Silence(f"no message from rank {link.prev} for {quiet:.0f}s")
            wire.idle_sleep(quiet)
            continue
        if msg.kind == wire.FORWARD:
            t0 = time.perf_counter()
            with keepalive.busy():
                x = stage.forward(wiredtype.decode(msg.payload, msg.flags), msg.seqs)   # [T, d] float32
                if last:
                    x = wire.ring_output(x, msg.seqs, msg.flags)
                msg.payload = wiredtype.encode(x, msg.flags)   # back in the --wire-dtype it came in
                threads.handoff()
            done["compute"] += time.perf_counter() - t0
            done["steps"] += 1
        elif msg.kind == wire.STATS:
            msg = with_row(msg)
        link.send(msg)      # a PING passes on as it came
        if msg.kind == wire.SHUTDOWN:
            return link.drain()
