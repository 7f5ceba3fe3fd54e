"""A worker rank's loop: receive a micro-batch from prev, run this stage's blocks, send it on."""
from __future__ import annotations

import time

import numpy as np
import torch

from shardline import wire
from shardline.metrics import rss_bytes
from shardline.stage import Stage


def serve(stage: Stage, link: wire.Link, rank: int, last: bool, should_stop) -> None:
    """Runs until rank 0's SHUTDOWN passes through, or should_stop() says the deadline to get one has gone."""
    compute, steps = 0.0, 0
    while True:
        msg = link.poll()
        if msg is None:
            link.reap()
            if should_stop():
                return
            wire.idle_sleep(time.monotonic() - link.last_traffic)
            continue
        if msg.kind == wire.FORWARD:
            t0 = time.perf_counter()
            x = stage.forward(torch.from_numpy(msg.payload), msg.seqs)               # [T, d]
            if last:
                x = wire.ring_output(x, msg.seqs, msg.flags)
            msg.payload = x.numpy()
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
