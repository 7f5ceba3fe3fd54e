"""Run under mpirun with two ranks over TCP: does a message leave while its sender computes?

    mpirun -np 2 --mca btl tcp,self --mca btl_tcp_progress_thread 1 \
        python -m mpi4py tests/cluster/progress_check.py --out result.json

Rank 0 sends rank 1 a FORWARD message through shardline.wire.Link (a header, then a prefill-sized
payload: --rows x --cols float32, 256 x 768 = 768 KiB by default, a distilgpt2 prefill chunk; and a
one-row decode hop) and at once computes for --compute seconds (torch matmuls, no MPI call), as a
stage does with its next micro-batch. Rank 1 polls its Link as an idle worker does and notes when
the payload has arrived. Both ranks are on this machine, so their CLOCK_MONOTONIC is the same
clock. Rank 1 writes, per message, {"rows", "bytes", "arrival_s"} (send to payload in hand).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mpi4py  # noqa: E402

mpi4py.rc.thread_level = "serialized"  # what shardline/node.py asks for
from mpi4py import MPI  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shardline import wire  # noqa: E402
from shardline.stage import Seq  # noqa: E402


def compute(seconds: float) -> None:
    """Busy for `seconds` with the CPU, not in MPI: what a stage's forward pass looks like to MPI."""
    a = torch.randn(256, 256)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--compute", type=float, default=0.3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    link = wire.Link(comm, prev=1 - rank, next=1 - rank)
    results = []
    for rows in (args.rows, 1, args.rows):  # the prefill chunk twice (the first pays the connection set-up)
        comm.Barrier()
        if rank == 0:
            payload = np.ones((rows, args.cols), np.float32)
            t_send = time.monotonic()
            link.send(wire.Message(wire.FORWARD, 1, 0, [Seq(0, 0, rows)], payload))
            compute(args.compute)
            comm.send(t_send, dest=1, tag=99)  # the next MPI call: without progress, the data leaves only now
            link.drain(10)
        else:
            while (msg := link.poll()) is None:
                time.sleep(0.0001)
            t_arrived = time.monotonic()
            t_send = comm.recv(source=0, tag=99)
            results.append({"rows": rows, "bytes": int(msg.payload.nbytes), "arrival_s": t_arrived - t_send})
    if rank == 1:
        Path(args.out).write_text(json.dumps(results))
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
