"""How each rank's OpenMP threads wait, so ranks sharing a host's cores take turns with all of them.

OpenMP threads that sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE) pay a wake-up per
region, several per layer; on a virtual machine, where an idle vCPU halts, that doubled a stage's
time (measured on the 2-core dev VM, three layers, one token, 2 threads: 5.9 ms passive, 2.8 ms
spinning, 5.5 ms on one thread). Spinning threads (ACTIVE) are fast but would burn the cores the next
rank needs, and an idle board's cores. So a rank with blocks spins, and calls Threads.idle() as soon
as it has nothing to compute: omp_pause_resource_all (OpenMP 5.0) ends the pool's threads, and the
next parallel region starts them again (one thread start per step instead of a wake-up per region).
A rank without blocks (rank 0 when it holds only the embeddings and the head) runs a few regions
per step, so its threads sleep instead: no thread starts at all, and one wake-up per region.
Measured with `python -m bench --try-variants`, 3 ranks on 2 cores (bench/README.md): one request
0.885x of transformers, against 0.76x with rank 0 spinning too and 0.70x with every rank sleeping.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
from pathlib import Path

OMP_PAUSE_SOFT = 1
_lib = None


def _libgomp():
    """The OpenMP runtime torch itself uses (its wheel ships its own libgomp), or False."""
    global _lib
    if _lib is None:
        import torch
        _lib = False
        for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*"))):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "omp_pause_resource_all"):
                _lib = lib
                break
    return _lib


RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def choose_wait_policy(model_dir) -> str:
    """Set OMP_WAIT_POLICY for this rank, unless the user has: PASSIVE for a rank without blocks,
    ACTIVE otherwise. Must run before torch is imported (the OpenMP runtime reads it once)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        policy = "ACTIVE"
        try:
            rank = int(next((os.environ[v] for v in RANK_ENV if v in os.environ), "0"))
            a, b = json.loads((Path(model_dir) / "manifest.json").read_text())["stages"][rank]["layers"]
            policy = "PASSIVE" if b == a else "ACTIVE"
        except Exception:  # noqa: BLE001 - a bad manifest is reported by the start-up checks
            pass
        os.environ["OMP_WAIT_POLICY"] = policy
    return os.environ["OMP_WAIT_POLICY"]


class Threads:
    """Tracks whether this rank's OpenMP threads may be spinning, and lets them go when it goes idle."""

    def __init__(self):
        self.busy = True   # loading the shard may have started them
        self.release = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"

    def computed(self) -> None:
        self.busy = True

    def idle(self) -> None:
        if self.busy and self.release:
            self.busy = False
            lib = _libgomp()
            if lib:
                lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
