"""python -m shardline.probe: the board's facts as JSON, plausible, and usable by the planner; cgroup
limits (v1 and v2) count; a running shardline rank's memory counts as usable."""
from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys

import pytest

from shardline import probe
from splitter.boards import board_from_probe, make_plan
from tests.test_plan import gpt2_cost

KEYS = {"name": str, "host": str, "arch": str, "system": str, "cores": int, "memory_total_mb": float, "memory_available_mb": float,
        "memory_shardline_mb": float, "memory_mb": float, "threads": int, "gbps": float, "gflops": float,
        "dtype": str, "torch": str}


@pytest.fixture(scope="module")
def facts():
    out = subprocess.run([sys.executable, "-m", "shardline.probe", "--seconds", "0.3", "--no-gpu", "--name", "pi-7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_probe_prints_the_documented_fields(facts):
    for key, kind in KEYS.items():
        assert isinstance(facts[key], kind), (key, facts[key])
    assert facts["gpu"] is None                                  # --no-gpu
    assert facts["cpu_quota"] is None or facts["cpu_quota"] > 0


def test_probe_figures_are_plausible(facts):
    assert facts["name"] == "pi-7" and facts["host"] == socket.gethostname() and facts["arch"] == platform.machine()
    assert 1 <= facts["threads"] <= facts["cores"]
    assert 0 < facts["memory_available_mb"] <= facts["memory_total_mb"]
    assert facts["memory_available_mb"] <= facts["memory_mb"] <= facts["memory_total_mb"]
    # A matvec over 64 MB of fp32: anything from a Pi Zero (0.5 GB/s) to an HBM GPU is plausible.
    assert 0.2 < facts["gbps"] < 5000, facts["gbps"]
    # fp32 GFLOP/s of a 128-row matmul: one slow core to many.
    assert 0.5 < facts["gflops"] < 1e6, facts["gflops"]
    assert facts["gflops"] / facts["gbps"] > 0.1                   # a batch reuses weights: more flops than bytes


def test_the_planner_takes_the_probe_output(facts, tmp_path):
    import yaml
    from splitter.boards import load_boards
    path = tmp_path / "boards.yml"                               # what the Ansible plan tag writes
    path.write_text(yaml.safe_dump([facts, dict(facts, name="pi-8")], sort_keys=False))
    assert [b.name for b in load_boards(path)] == ["pi-7", "pi-8"]
    board = board_from_probe("here", facts)
    plan = make_plan([board], gpt2_cost(), slots=1, max_context=64)
    assert plan.stages[0].board == "here" and plan.stages[0].gbps == facts["gbps"] and not plan.stages[0].speed_assumed


def test_seconds_must_be_positive():
    out = subprocess.run([sys.executable, "-m", "shardline.probe", "--seconds", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "--seconds must be positive" in out.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_memory_and_cpu_limits_count(tmp_path, monkeypatch, version):
    root = tmp_path / "cgroup"
    if version == "v2":
        (root / "board").mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory\n")
        (root / "board" / "memory.max").write_text(f"{256 * 2**20}\n")
        (root / "board" / "memory.current").write_text(f"{100 * 2**20}\n")
        (root / "board" / "memory.stat").write_text(f"anon 1\ninactive_file {20 * 2**20}\n")
        (root / "board" / "cpu.max").write_text("50000 100000\n")
        cgroup = "0::/board\n"
    else:
        for ctl in ("memory", "cpu"):
            (root / ctl / "board").mkdir(parents=True)
        (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # v1's "no limit"
        (root / "memory" / "board" / "memory.limit_in_bytes").write_text(f"{256 * 2**20}\n")
        (root / "memory" / "board" / "memory.usage_in_bytes").write_text(f"{100 * 2**20}\n")
        (root / "memory" / "board" / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {20 * 2**20}\n")
        (root / "cpu" / "board" / "cpu.cfs_quota_us").write_text("50000\n")
        (root / "cpu" / "board" / "cpu.cfs_period_us").write_text("100000\n")
        cgroup = "4:memory:/board\n2:cpu,cpuacct:/board\n"
    (tmp_path / "self-cgroup").write_text(cgroup)
    monkeypatch.setattr(probe, "CGROUP_ROOT", root)
    monkeypatch.setattr(probe, "PROC_CGROUP", tmp_path / "self-cgroup")
    if version == "v1":
        (root / "cpu,cpuacct").symlink_to(root / "cpu")
    limits = probe.cgroup_limits()
    assert limits == {"memory_limit": 256 * 2**20, "memory_free": 176 * 2**20, "cpu_quota": 0.5}
    mem = probe.memory()
    assert mem["memory_total_mb"] == 256 and mem["memory_available_mb"] == 176 and mem["cpu_quota"] == 0.5


def test_a_running_rank_counts_as_usable_memory(tmp_path):
    # A process that looks like a shardline rank (main.py --model-dir ...), holding 64 MB.
    rank = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); print(1, flush=True); "
                             "time.sleep(60)", "main.py", "--model-dir", str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert rank.stdout.readline().strip() == b"1"
        assert probe.shardline_ranks()[rank.pid] >= 64 * 2**20
        mem = probe.memory()
        assert mem["memory_shardline_mb"] >= 64
        assert mem["memory_mb"] == pytest.approx(min(mem["memory_total_mb"],
                                                     mem["memory_available_mb"] + mem["memory_shardline_mb"]), abs=0.2)
    finally:
        rank.kill()
        rank.wait()
    assert rank.pid not in probe.shardline_ranks()
