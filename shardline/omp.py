"""Each rank's OpenMP threads: how many, where they run, how they wait. Ranks sharing a host's cores
take turns with all of them.

Decided by configure() before torch loads (the OpenMP runtime reads its environment once), from the
launcher's environment and the manifest, unless the user has set the variable:

- Threads: all the cores this rank may use, since its threads run only while it computes. Ranks
  sharing a host take turns when the ring holds one micro-batch (the default when every rank is on
  one host); only where they may compute at once (several hosts, or --microbatches above 1) do they
  split the cores, each local rank its own.
- Waiting (OMP_WAIT_POLICY): threads that sleep between parallel regions pay a wake-up per region,
  several per layer; on a virtual machine, where an idle vCPU halts, that doubled a stage's time
  (three layers, one token, 2 threads: 5.9 ms sleeping, 2.8 ms spinning). So a rank with blocks
  spins (ACTIVE) while it computes. A rank without blocks (rank 0 when it holds only the embeddings
  and the head) runs a few regions per step, so its threads sleep (PASSIVE) and need no release.
- Hand-off (Threads.handoff): a spinning rank ends its threads (omp_pause_resource_all, OpenMP 5.0)
  before it sends its output on, so the next rank, maybe on the same cores, starts on free ones; the
  next parallel region starts them again. Threads.idle() does the same whenever a rank has nothing
  to compute, so an idle board does not spin.
- Pinning (OMP_PROC_BIND=close, OMP_PLACES one core each): thread i of every rank that takes turns
  runs on core i, so a starting thread is never put on the core its own master spins on. The
  HTTP thread on rank 0 inherits core 0 (measured better than letting it run anywhere).
Measured with `python -m bench` (3 ranks on 2 cores, one request, against transformers): hand-off
after the send, unpinned (before) 0.86-0.98x; hand-off before the send 1.00-1.02x unpinned and
1.01-1.07x pinned; pinned with the hand-off after the send 0.84x. See bench/README.md.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
from pathlib import Path

OMP_PAUSE_SOFT = 1
_lib = None

# What a launcher sets in each process: the rank, the world size, and this host's share of it.
RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_SIZE_ENV = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
LAUNCH_ENV = RANK_ENV + SIZE_ENV + LOCAL_SIZE_ENV


def _env_int(names, default: int) -> int:
    return int(next((os.environ[v] for v in names if v in os.environ), default))


def launched() -> bool:
    """Started by mpirun (or another MPI launcher), rather than as a plain one-process `python main.py`."""
    return any(v in os.environ for v in LAUNCH_ENV)


def world_rank() -> int:
    """This process's rank, from the launcher's environment (readable before MPI starts); 0 without one."""
    return _env_int(RANK_ENV, 0)


def local_ranks() -> int:
    """How many ranks share this host (so they can share its cores)."""
    return max(1, _env_int(LOCAL_SIZE_ENV, 1))


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (an MPI launcher may have bound it to some)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def takes_turns(size: int, microbatches: int | None) -> bool:
    """Whether the ranks on this host compute one at a time: alone on it, or all ranks on this one
    host with one micro-batch in the ring."""
    local = local_ranks()
    return local == 1 or (local >= size and (microbatches or 1) == 1)


def default_threads(size: int, microbatches: int | None = None) -> int:
    """Torch threads when --threads is not given: every usable core when this host's ranks take turns,
    else an equal share of them."""
    cores = len(usable_cpus())
    return cores if takes_turns(size, microbatches) else max(1, cores // local_ranks())


def configure(model_dir, threads: int | None = None, microbatches: int | None = None) -> int:
    """Set this rank's OpenMP environment (see the module's doc) and return its torch thread count.
    Must run before torch is imported."""
    size = max(1, _env_int(SIZE_ENV, 1))
    threads = threads or default_threads(size, microbatches)
    choose_wait_policy(model_dir)
    if not any(v in os.environ for v in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")):
        cpus = usable_cpus()
        first = 0 if takes_turns(size, microbatches) else _env_int(LOCAL_RANK_ENV, 0) * threads
        mine = cpus[first:first + threads]
        if len(mine) == threads:         # else more threads than cores: leave placement to the system
            os.environ["OMP_PLACES"] = ",".join(f"{{{c}}}" for c in mine)
            os.environ["OMP_PROC_BIND"] = "close"
    return threads


def choose_wait_policy(model_dir) -> str:
    """Set OMP_WAIT_POLICY for this rank, unless the user has: PASSIVE for a rank without blocks,
    ACTIVE otherwise."""
    if "OMP_WAIT_POLICY" not in os.environ:
        policy = "ACTIVE"
        try:
            rank = _env_int(RANK_ENV, 0)
            a, b = json.loads((Path(model_dir) / "manifest.json").read_text())["stages"][rank]["layers"]
            policy = "PASSIVE" if b == a else "ACTIVE"
        except Exception:  # noqa: BLE001 - a bad manifest is reported by the start-up checks
            pass
        os.environ["OMP_WAIT_POLICY"] = policy
    return os.environ["OMP_WAIT_POLICY"]


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


class Threads:
    """Tracks whether this rank's OpenMP threads may be spinning, and lets them go when it goes idle."""

    def __init__(self):
        self.busy = True   # loading the shard may have started them
        self.release = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"

    def computed(self) -> None:
        self.busy = True

    def handoff(self) -> None:
        """This rank has computed and is about to pass its output on: end its spinning threads first,
        so the next rank, maybe on these same cores, starts on free ones."""
        self.busy = True
        self.idle()

    def idle(self) -> None:
        if self.busy and self.release:
            self.busy = False
            lib = _libgomp()
            if lib:
                lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
