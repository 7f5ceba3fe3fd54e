"""Boards over TCP: messages leave while their sender computes, emulated boards get (and lose) their
limits, and the cluster launch uses the settings the benchmark measured.

- Progress over TCP (issue 11, item 4): two ranks on loopback with Open MPI's TCP transport, the way
  ranks on two boards talk. Rank 0 sends a prefill-sized message through shardline.wire.Link and
  computes for 300 ms; with the project's settings (wire.TCP_MCA) it arrives within milliseconds.
  The same run without Open MPI's TCP progress thread shows what happens otherwise (300 ms late),
  so the test would notice if the settings stopped working. No root needed.
- Emulated boards (item 1, tests/cluster/testhosts.py): a test host given one core, half a core's
  CPU time, 256 MiB and a 100 Mbit link has exactly those, a process over its memory is killed, and
  everything is gone afterwards. Needs root (skips with the reason otherwise).
- Same settings everywhere (item 5): launch.sh (rendered by Ansible) and `python -m bench --boards`
  pass the same MCA settings, wire.TCP_MCA.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardline import wire
from tests.cluster import testhosts
from tests.helpers import MPIRUN, PY, ROOT, mpi_env

# Their checks time cores and links of emulated boards: no other test runs meanwhile (conftest.py).
pytestmark = pytest.mark.alone

COMPUTE_S = 0.3
ROWS, COLS = 256, 768  # a distilgpt2 prefill chunk (--max-batch-tokens 256): 768 KiB of float32


# TCP_MCA's progress settings without mpi_ft_enable, which is about failures, not progress: with it, Open
# MPI 5.0.11's MPI_Finalize crashed now and then in this two-rank script under load (5 of 15 runs beside a
# busy core, 0 of 15 without it: a segfault in ompi_comm_shrink_internal, or "Out of resource" at
# ompi_mpi_finalize.c:163).
PROGRESS_MCA = tuple((k, v) for k, v in wire.TCP_MCA if k != "mpi_ft_enable")


def _progress_run(tmp_path: Path, mca: tuple) -> list[dict]:
    out = tmp_path / "progress.json"
    env = mpi_env()
    env["OMPI_MCA_btl_tcp_if_include"] = "lo"
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", "--bind-to", "none", *wire.mca_args(mca),
           PY, "-m", "mpi4py", str(ROOT / "tests" / "cluster" / "progress_check.py"),
           "--rows", str(ROWS), "--cols", str(COLS), "--compute", str(COMPUTE_S), "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


@pytest.mark.timeout(150)
def test_a_prefill_sized_message_arrives_while_its_sender_computes(tmp_path):
    results = _progress_run(tmp_path, PROGRESS_MCA)
    assert [r["bytes"] for r in results] == [ROWS * COLS * 4, COLS * 4, ROWS * COLS * 4]
    for r in results:
        # Not held back by the 300 ms of compute after the send (it takes ~1 ms on loopback).
        assert r["arrival_s"] < COMPUTE_S / 3, f"{r['bytes']} bytes arrived {r['arrival_s'] * 1e3:.0f} ms after the send"


@pytest.mark.timeout(150)
def test_without_the_progress_thread_open_mpi_holds_a_large_message_until_the_next_call(tmp_path):
    """What TCP_MCA is for: the same run with Open MPI's defaults. A rendezvous message (above the
    64 KiB eager limit) waits for the sender's compute; an eager one (one decode row) does not."""
    defaults = tuple((k, v) for k, v in PROGRESS_MCA if k != "btl_tcp_progress_thread")
    prefill, decode, prefill_again = _progress_run(tmp_path, defaults)
    assert decode["arrival_s"] < COMPUTE_S / 3
    assert prefill_again["arrival_s"] >= COMPUTE_S * 0.9, (
        "Open MPI now sends large TCP messages without the sender's next MPI call: "
        f"{prefill_again['arrival_s'] * 1e3:.0f} ms; TCP_MCA's progress thread may be unneeded")


# ---- emulated boards ----

BOARDS_SKIP = testhosts.skip_reason() or testhosts.board_skip_reason()
needs_boards = pytest.mark.skipif(BOARDS_SKIP is not None, reason=f"emulated boards skipped: {BOARDS_SKIP}")

BURN = "import time\nt = time.time(); c = time.process_time()\nwhile time.time() - t < 1: pass\nprint(time.process_time() - c)"
SINK = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 5001)); s.listen(); c, _ = s.accept()\n"
        "while c.recv(1 << 16): pass\nc.sendall(b'x')")
# the sink starts over SSH on a board with half a core: the source retries until it listens (10 s)
SOURCE = ("import socket, sys, time\nt0 = time.time()\nwhile True:\n"
          "    try:\n        s = socket.create_connection((sys.argv[1], 5001)); break\n"
          "    except OSError:\n        time.sleep(0.1)\n        assert time.time() - t0 < 10, 'no sink'\n"
          "b = bytes(1 << 20)\n"
          "t = time.time()\nfor _ in range(6): s.sendall(b)\ns.shutdown(1); s.recv(1)\nprint(48 / (time.time() - t))")


def _py(code: str, *args: str) -> str:
    import shlex
    return f"python3 -c {shlex.quote(code)} {' '.join(args)}"


@needs_boards
@pytest.mark.timeout(120)
def test_an_emulated_board_has_its_limits_and_they_are_removed_afterwards():
    board = testhosts.Board(cpus="0", cpu_share=0.5, memory="256m", rate="100mbit")
    hosts = testhosts.TestHosts(2, shared_paths=[Path(sys.base_prefix), Path(sys.prefix), ROOT], boards=[board, None])
    try:
        try:
            hosts.start()
        except testhosts.HostsUnavailable as err:
            pytest.skip(f"emulated boards skipped: {err}")
        slow, other = hosts.hosts

        def sh(host, command):
            result = hosts.run(host, command)
            return result.returncode, result.stdout.strip()

        assert sh(slow, "nproc") == (0, "1")  # its cpuset: one core
        assert sh(other, "nproc") == (0, str(len(testhosts.os.sched_getaffinity(0))))  # no limits: this machine's
        cpu = testhosts._own_cgroup("cpu") / slow.netns
        quota, period = (int((cpu / f).read_text()) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        assert quota == period // 2, f"half a core: quota {quota} us per {period} us"
        # The quota caps what it gets whatever else runs; below the cap depends on the machine's load.
        rc, busy = sh(slow, _py(BURN))
        assert rc == 0 and 0.05 < float(busy) < 0.6, f"half a core's CPU time: a 1 s busy loop got {busy} s"
        # (through a shell: ssh itself answers 255 for a command killed by a signal)
        _, status = sh(slow, _py("b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])") + "; echo $?")
        assert status.splitlines()[-1] == "137", f"400 MiB on a 256 MiB board must be OOM-killed (SIGKILL): {status}"
        assert sh(slow, _py("b = bytearray(64 << 20); print(len(b))")) == (0, str(64 << 20))

        # 100 Mbit both ways: its uploads (tbf on its eth0) and what it receives (tbf on the bridge end).
        for sender, receiver in ((slow, other), (other, slow)):
            sink = subprocess.Popen(hosts.ssh_argv(receiver, _py(SINK)), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                rc, mbit = sh(sender, _py(SOURCE, receiver.address))
                assert rc == 0 and 70 < float(mbit) < 105, f"{sender.name} -> {receiver.name}: {mbit} Mbit/s"
            finally:
                sink.wait(timeout=10)
        groups = [testhosts._own_cgroup(c) / slow.netns for c in testhosts.CONTROLLERS]
        assert all(g.is_dir() for g in groups)
    finally:
        hosts.stop()
    assert not [g for g in groups if g.exists()], "the board's cgroups outlived the test hosts"
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert testhosts.BRIDGE not in links and f"{testhosts.PREFIX}v" not in links
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{testhosts.PREFIX}-h" not in netns


@pytest.mark.parametrize("text, bits", [("1gbit", 10**9), ("100mbit", 10**8), ("2.5mbit", 2_500_000)])
def test_link_rates_parse(text, bits):
    assert testhosts.parse_rate(text) == bits


@pytest.mark.parametrize("bad", [dict(cpus="zero"), dict(cpu_share=0), dict(memory="1m"), dict(rate="fast")])
def test_a_bad_board_is_refused_with_what_to_write(bad):
    with pytest.raises(ValueError, match=r"expected|below"):
        testhosts.Board(**bad)


# ---- the same settings everywhere ----

def _mca_pairs(argv: list[str]) -> dict[str, str]:
    return {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--mca"}


def test_launch_script_and_bench_pass_the_same_open_mpi_settings(tmp_path):
    from tests.test_ansible import _render
    script = _render("launch.sh.j2", tmp_path / "launch.sh")
    launch = _mca_pairs(re.sub(r"\\\n", " ", script).split())
    assert launch.items() >= dict(wire.TCP_MCA).items(), launch
    from bench.boards import cluster_mpirun
    bench = _mca_pairs(cluster_mpirun(["10.0.0.1", "10.0.0.2"], Path("parts"), 8000, "10.0.0.0/24", ["ssh"]))
    assert bench.items() >= dict(wire.TCP_MCA).items(), bench
    # and the interface selection both make from the one setting (shardline_mpi_if_include)
    assert bench["btl_tcp_if_include"] == bench["oob_tcp_if_include"] == "10.0.0.0/24"
    # the example hostfile's command for boards, too (with --enable-recovery, which ULFM runs under)
    example = " ".join(line.lstrip("#").strip() for line in (ROOT / "hostfiles" / "pis.example").read_text().splitlines()
                       if line.startswith("#")).replace("\\ ", "")
    command = example.split("mpirun", 1)[1].split("--host 0.0.0.0")[0].split()
    assert _mca_pairs(command).items() >= dict(wire.TCP_MCA).items() and "--enable-recovery" in command, command


# ---- the bench's own figures ----

def test_bench_boards_serves_every_client_at_once_and_measures_the_steady_state():
    from bench.boards import parse_args
    cfg = parse_args(["--boards", "2"])
    assert cfg.slots == 32 and cfg.rounds == 4          # 32 clients served at once, 4 requests each
    cfg = parse_args(["--boards", "2", "--clients", "1,8", "--slots", "12", "--rounds", "2"])
    assert (cfg.slots, cfg.rounds, cfg.clients) == (12, 2, [1, 8])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_core_ceiling_times_one_core_alone_and_every_core_at_once():
    from bench.boards import core_ceiling
    cores = sorted(os.sched_getaffinity(0))[:2]
    c = core_ceiling(cores, 4, 256, tries=3)   # the median of three: one try alone read 2.61 on this VM
    assert c["cores"] == cores and c["shape"] == [4, 256, 1024] and len(c["ms_together"]) == 2
    assert c["ms_alone"] > 0 and all(t > 0 for t in c["ms_together"])
    # the sum of (alone / together) over the cores: at most a little over one per core (noise)
    assert c["ceiling"] == pytest.approx(sum(c["ms_alone"] / t for t in c["ms_together"]), rel=0.03, abs=0.02)
    assert 0.3 < c["ceiling"] < 2.6
