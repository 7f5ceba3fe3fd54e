"""A worker rank's loop: receive a micro-batch from prev, run this stage's blocks, send it on."""
from __future__ import annotations

import time

import numpy as np

from shardline import omp, wire, wiredtype
from shardline.metrics import rss_bytes
from shardline.stage import Stage


class Silence(Exception):
    """Nothing came from the previous rank for too long: rank 0's heartbeat stopped, so the job is broken."""


def serve(stage: Stage, link: wire.Link, rank: int, last: bool, should_stop, silence_timeout: float = 0) -> None:
    """Runs until rank 0's SHUTDOWN passes through, or should_stop() says the deadline to get one has gone.
    Raises Silence after silence_timeout seconds (0 = never) without a message: rank 0 sends a STATS
    heartbeat every few seconds, so silence means a rank before this one is dead or hung."""
    compute, steps = 0.0, 0
    threads = omp.Threads()
    while True:
        msg = link.poll()
        if msg is None:
            threads.idle()
            link.reap()
            if should_stop():
                return
            quiet = time.monotonic() - link.last_traffic
            if silence_timeout and quiet > silence_timeout:
                raise Silence(f"no message from rank {link.prev} for {quiet:.0f}s")
            wire.idle_sleep(quiet)
            continue
        if msg.kind == wire.FORWARD:
            t0 = time.perf_counter()
            x = stage.forward(wiredtype.decode(msg.payload, msg.flags), msg.seqs)   # [T, d] float32
            if last:
                x = wire.ring_output(x, msg.seqs, msg.flags)
            msg.payload = wiredtype.encode(x, msg.flags)   # back in the --wire-dtype it came in
            threads.handoff()
            compute += time.perf_counter() - t0
            steps += 1
        elif msg.kind == wire.STATS:
            rss, peak = rss_bytes()
            row = [rank, compute, link.bytes_sent, link.bytes_recv, steps, rss, peak]
            msg.payload = np.vstack([msg.payload, np.array([row], np.float64)])
        link.send(msg)
        if msg.kind == wire.SHUTDOWN:
            link.drain()
            return
