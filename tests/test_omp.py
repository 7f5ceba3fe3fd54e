"""How ranks' OpenMP threads wait: the policy per rank, and an idle rank's spinning threads let go."""
import json
import subprocess

from tests.helpers import PY, ROOT

from shardline import omp


def test_policy_sleeps_on_a_rank_without_blocks_and_spins_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": [{"layers": [0, 0]}, {"layers": [0, 3]}]}))
    for var in ("OMP_WAIT_POLICY", *omp.RANK_ENV):
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
t = time.perf_counter(); b = a @ a; again = time.perf_counter() - t   # the pool comes back
print(spinning, idle, tasks_spinning, tasks_idle, bool(torch.allclose(b, a @ a)))
"""


def test_an_idle_rank_lets_its_spinning_threads_go():
    out = subprocess.run([PY, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    spinning, idle, tasks_spinning, tasks_idle, same = out.stdout.split()
    assert float(spinning) > 0.2, "the OpenMP thread should spin while the rank is busy (ACTIVE)"
    assert float(idle) < 0.05, f"an idle rank still took {float(idle):.2f} s of CPU in 0.4 s"
    assert int(tasks_idle) == int(tasks_spinning) - 1 and same == "True"
