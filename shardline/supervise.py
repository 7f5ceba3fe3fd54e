"""python -m shardline.supervise [--restart] -- mpirun ... main.py ...

Runs the MPI job and keeps it running. Two things mpirun alone does badly:
- Stopping: a signal to mpirun kills every rank ~0.25 s later. The supervisor instead signals rank 0
  (its PID comes through SHARDLINE_PID_FILE), which answers the waiting clients and shuts the ring
  down; mpirun is killed only if that takes over --stop-timeout seconds.
- Failures: when the job ends with an error (a board died or hung, and rank 0 gave up on it), the
  supervisor starts it again with a short backoff. Exit status 78 (a refused start: a bad shard, a
  wrong rank count) is not retried: it would fail the same way.
The job runs in its own session, so Ctrl-C in a terminal reaches the supervisor only.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from shardline import EX_CONFIG  # a refused start: not retried


def log(msg: str) -> None:
    print(f"[supervise] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardline.supervise", description=__doc__.split("\n\n")[1])
    ap.add_argument("--restart", action="store_true", help="start the job again when it fails")
    ap.add_argument("--max-backoff", type=float, default=10.0, help="longest wait between restarts, seconds")
    ap.add_argument("--stop-timeout", type=float, default=8.0, help="seconds rank 0 gets to stop the job")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mpirun command")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the job's command after --")

    pid_file = os.environ.get("SHARDLINE_PID_FILE") or os.path.join(tempfile.mkdtemp(prefix="shardline-"), "rank0.pid")
    env = dict(os.environ, SHARDLINE_PID_FILE=pid_file)
    stopping = []
    job: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        if not stopping:
            stopping.append(time.monotonic())
            log(f"signal {signum}: stopping the job")
            if job is not None and job.poll() is None:
                _signal_rank0(pid_file, job)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff = 1.0
    while True:
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass
        started = time.monotonic()
        job = subprocess.Popen(cmd, env=env, start_new_session=True)
        code = _wait(job, stopping, args.stop_timeout)
        if stopping:
            log(f"job stopped (status {code})")
            return 0 if code in (0, -signal.SIGTERM) else code
        if code == 0:
            return 0
        if code == EX_CONFIG:
            log("the job refused to start (status 78: see the message above); not restarting")
            return code
        if not args.restart:
            return code
        if time.monotonic() - started > 60:
            backoff = 1.0
        log(f"job ended with status {code}; restarting in {backoff:.0f}s")
        end = time.monotonic() + backoff
        while time.monotonic() < end and not stopping:
            time.sleep(0.1)
        if stopping:
            return 0
        backoff = min(backoff * 2, args.max_backoff)


def _signal_rank0(pid_file: str, job: subprocess.Popen) -> None:
    try:
        pid = int(open(pid_file).read().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        _kill_group(job, signal.SIGTERM)   # rank 0 is not up yet: stop mpirun itself


def _kill_group(job: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(job.pid, sig)
    except ProcessLookupError:
        pass


def _wait(job: subprocess.Popen, stopping: list, stop_timeout: float) -> int:
    """Wait for the job; once a stop was asked, escalate to SIGTERM then SIGKILL of its process group."""
    escalated = 0
    while True:
        try:
            return job.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if stopping:
            waited = time.monotonic() - stopping[0]
            if escalated == 0 and waited > stop_timeout:
                log("rank 0 did not stop the job in time; signalling mpirun")
                _kill_group(job, signal.SIGTERM)
                escalated = 1
            elif escalated == 1 and waited > stop_timeout + 3:
                _kill_group(job, signal.SIGKILL)
                escalated = 2


if __name__ == "__main__":
    sys.exit(main())
