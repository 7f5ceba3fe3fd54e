"""The pipeline under test: `mpirun ... main.py` on loopback, its rank processes, and its /metrics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


class Pipeline:
    """mpirun -np RANKS main.py in its own process group, on 127.0.0.1 only; env goes to every rank (-x)."""

    def __init__(self, parts: Path, ranks: int, args: list[str], env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
        if os.geteuid() == 0:
            full_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        full_env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")    # loopback only
        full_env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
        exports = [a for k in env for a in ("-x", k)]
        self.cmd = [MPIRUN, "-np", str(ranks), "--oversubscribe", "--bind-to", "none", "--enable-recovery", *exports,
                    PY, "-m", "mpi4py", str(ROOT / "main.py"), "--model-dir", str(parts),
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> dict:
        return wait_healthy(self.proc, self.url, self.log_path, timeout, interval=0.25)

    def rank_processes(self) -> dict[int, psutil.Process]:
        out = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in children:
            try:
                env = p.environ()
                if "OMPI_COMM_WORLD_RANK" in env and any("main.py" in a for a in p.cmdline()):
                    out[int(env["OMPI_COMM_WORLD_RANK"])] = p
            except psutil.Error:
                continue
        return out

    def all_processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 20) -> int | None:
        """The clean way (as shardline's supervisor does it): SIGTERM to rank 0, which shuts the ring down
        and exits 0; mpirun then ends. Signalling mpirun instead makes it kill every rank (status 1).
        Falls back to the whole process group if the job does not end in time."""
        if self.proc.poll() is None:
            head = self.rank_processes().get(0)
            try:
                if head is not None:
                    head.send_signal(signal.SIGTERM)
                    self.proc.wait(timeout)
                else:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, psutil.Error):
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
                except ProcessLookupError:
                    pass
        self.log.close()
        return self.proc.returncode


# ---- /metrics ----

def parse_metrics(text: str) -> dict:
    """The figures the benchmark uses, from the Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families
    ranks: dict[int, dict] = {}
    flat: dict[str, float] = {}
    gauges = {"shardline_rank_compute_seconds": "compute_seconds", "shardline_rank_bytes_sent": "bytes_sent",
              "shardline_rank_bytes_received": "bytes_received", "shardline_rank_steps": "steps",
              "shardline_rank_rss_bytes": "rss_bytes", "shardline_rank_peak_rss_bytes": "peak_rss_bytes"}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in gauges:
                ranks.setdefault(int(s.labels["rank"]), {})[gauges[s.name]] = s.value
            elif not s.labels or set(s.labels) == {"le"} and s.labels["le"] == "+Inf":
                flat[s.name] = s.value
    return {"ranks": ranks,
            "generated_tokens": flat.get("shardline_generated_tokens_total", 0.0),
            "prompt_tokens": flat.get("shardline_prompt_tokens_total", 0.0),
            "step_count": flat.get("shardline_pipeline_step_seconds_count", 0.0),
            "step_sum": flat.get("shardline_pipeline_step_seconds_sum", 0.0),
            "t": time.monotonic()}


def fresh_metrics(url: str, n_ranks: int, timeout: float = 10.0) -> dict:
    """A /metrics snapshot whose per-rank gauges (refreshed every ~2 s through the ring) have caught up
    with every micro-batch completed so far: each rank's step count equals the live step histogram's."""
    end = time.monotonic() + timeout
    snap = None
    while time.monotonic() < end:
        snap = parse_metrics(get(url + "/metrics")[1])
        r = snap["ranks"]
        if len(r) == n_ranks and all(r[k].get("steps") == snap["step_count"] for k in r):
            snap["fresh"] = True
            return snap
        time.sleep(0.25)
    snap["fresh"] = False
    return snap


def wait_healthy(proc, url: str, log_path: Path, timeout: float, interval: float = 0.25) -> dict:
    """Poll url/health until it answers 200 (its JSON); an exited process or the timeout raises, with
    the end of its log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; log {log_path}:\n"
                               f"{log_path.read_text()[-3000:]}")
        try:
            status, body = get(url + "/health", timeout=2)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"no /health from {url} within {timeout}s; log {log_path}")
