"""Ranks' OpenMP threads: how many, pinned where, how they wait, and an idle rank's spinning threads let go."""
import json
import os
import subprocess

import pytest

from tests.helpers import PY, ROOT

from shardline import omp

# Their checks measure the CPU threads take: no other test runs meanwhile (conftest.py).
pytestmark = pytest.mark.alone


def test_policy_sleeps_on_a_rank_without_blocks_and_spins_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": [{"layers": [0, 0]}, {"layers": [0, 3]}]}))
    for var in ("OMP_WAIT_POLICY", *omp.LAUNCH_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert omp.choose_wait_policy(tmp_path) == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert omp.choose_wait_policy(tmp_path) == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")               # the user's choice stands
    assert omp.choose_wait_policy(tmp_path) == "passive"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert omp.choose_wait_policy(tmp_path / "missing") == "ACTIVE"  # start-up checks report that later


PROBE = """
import os, sys, time, torch
from shardline import omp
torch.set_num_threads(2)
a = torch.randn(1500, 1500)
def busy(seconds):                       # CPU this process takes while its main thread sleeps
    c = time.process_time(); time.sleep(seconds); return time.process_time() - c
threads = omp.Threads()
a @ a; threads.computed()
spinning, tasks_spinning = busy(0.4), len(os.listdir("/proc/self/task"))
threads.idle()
idle, tasks_idle = busy(0.4), len(os.listdir("/proc/self/task"))
b = a @ a; tasks_back = len(os.listdir("/proc/self/task"))             # the pool comes back
print(spinning, idle, tasks_spinning, tasks_idle, tasks_back, bool(torch.allclose(b, a @ a)))
"""


def test_an_idle_rank_lets_its_spinning_threads_go():
    out = subprocess.run([PY, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    spinning, idle, tasks_spinning, tasks_idle, tasks_back, same = out.stdout.split()
    assert float(spinning) > 0.2, "the OpenMP thread should spin while the rank is busy (ACTIVE)"
    assert float(idle) < 0.05, f"an idle rank still took {float(idle):.2f} s of CPU in 0.4 s"
    assert int(tasks_idle) == int(tasks_spinning) - 1, "the idle rank's OpenMP thread did not go"
    assert int(tasks_back) == int(tasks_spinning) and same == "True", "the next matmul did not get its pool back"


OMP_VARS = ("OMP_WAIT_POLICY", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", *omp.LAUNCH_ENV,
            *omp.LOCAL_RANK_ENV)


@pytest.fixture
def launch(tmp_path, monkeypatch):
    """configure() for a rank as a launcher would start it, on a host with the given CPUs."""
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": [{"layers": [0, 0]}] + [{"layers": [0, 1]}] * 5}))

    def go(cpus, size=1, local_size=1, local_rank=0, rank=0, threads=None, microbatches=None, **user):
        for var in OMP_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(omp, "usable_cpus", lambda: list(cpus))
        if size > 1:
            monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))
            monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(rank))
            monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(local_size))
            monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", str(local_rank))
        for k, v in user.items():
            monkeypatch.setenv(k, v)
        n = omp.configure(tmp_path, threads, microbatches)
        return n, os.environ.get("OMP_PLACES"), os.environ.get("OMP_PROC_BIND")
    return go


def test_ranks_taking_turns_use_every_core_one_thread_each(launch):
    # three ranks on one host, one micro-batch in the ring: each uses both cores, thread i on core i
    assert launch([0, 1], size=3, local_size=3, local_rank=2, rank=2) == (2, "{0},{1}", "close")
    assert launch([4, 6, 7], size=1) == (3, "{4},{6},{7}", "close")      # the CPUs it may use, not 0..n-1
    assert launch([0, 1, 2, 3], size=3, local_size=3, threads=2) == (2, "{0},{1}", "close")


def test_ranks_computing_at_once_get_their_own_cores(launch):
    # six ranks on two hosts (three each): micro-batches overlap, so this host's ranks split its cores
    assert launch(range(8), size=6, local_size=3, local_rank=0) == (2, "{0},{1}", "close")
    assert launch(range(8), size=6, local_size=3, local_rank=2, rank=5) == (2, "{4},{5}", "close")
    # one host, but --microbatches 2: the same
    assert launch(range(4), size=2, local_size=2, local_rank=1, rank=1, microbatches=2) == (2, "{2},{3}", "close")


def test_placement_left_alone_when_the_user_set_it_or_threads_outnumber_cores(launch):
    assert launch([0, 1], OMP_PLACES="cores") == (2, "cores", None)
    assert launch([0, 1], OMP_PROC_BIND="false") == (2, None, "false")
    assert launch([0, 1], threads=4) == (4, None, None)


BIND_PROBE = """
import json, os, sys
from shardline import omp
cpus = omp.usable_cpus()
threads = omp.configure(sys.argv[1])
import torch                                    # after configure(), as in main.py
torch.set_num_threads(threads)
a = torch.randn(1000, 1000)
for _ in range(3):
    a @ a
bound = []
for t in os.listdir("/proc/self/task"):
    mask = os.sched_getaffinity(int(t))
    if len(mask) == 1:
        bound.append(min(mask))
print(json.dumps([threads, cpus, sorted(bound)]))
"""


def test_the_openmp_runtime_pins_the_threads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": [{"layers": [0, 1]}]}))
    env = {"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([PY, "-c", BIND_PROBE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    threads, cpus, bound = json.loads(out.stdout.splitlines()[-1])
    assert threads == len(cpus)
    assert sorted(set(bound)) == cpus and len(bound) >= threads      # every thread on its own core
