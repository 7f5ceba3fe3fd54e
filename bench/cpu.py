"""How busy the machine was during a phase, and how much of that was someone else.

The benchmark runs on a small shared machine. A phase's CPU split into ours (the processes we
started) and foreign (everything else) says whether a slow figure is the code or a noisy neighbour.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import psutil


def _busy(t) -> float:
    return sum(v for k, v in t._asdict().items() if k not in ("idle", "iowait", "guest", "guest_nice"))


def _proc_cpu(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


class CpuWatch:
    """start() ... stop() -> {"wall_s", "cores", "busy_cores", "ours_cores", "foreign_cores", "load_avg"}.

    procs() lists the processes that count as ours (sampled at both ends; a process seen only at the
    end counts with all its CPU time, one that vanished counts with what it had at the start)."""

    def __init__(self, procs: Callable[[], Iterable[psutil.Process]]):
        self.procs = procs

    def _ours(self) -> dict[int, float]:
        out = {}
        for p in self.procs():
            v = _proc_cpu(p)
            if v is not None:
                out[p.pid] = v
        return out

    def start(self) -> CpuWatch:
        self.t0, self.sys0, self.ours0 = time.monotonic(), _busy(psutil.cpu_times()), self._ours()
        return self

    def stop(self) -> dict:
        wall = max(1e-9, time.monotonic() - self.t0)
        busy = _busy(psutil.cpu_times()) - self.sys0
        ours1 = self._ours()
        ours = sum(v - self.ours0.get(pid, 0.0) for pid, v in ours1.items())
        cores = os.cpu_count() or 1
        return {"wall_s": round(wall, 3), "cores": cores, "busy_cores": round(busy / wall, 3),
                "ours_cores": round(ours / wall, 3), "foreign_cores": round(max(0.0, busy - ours) / wall, 3),
                "load_avg": [round(x, 2) for x in os.getloadavg()]}


def self_and_children() -> list[psutil.Process]:
    me = psutil.Process()
    try:
        return [me, *me.children(recursive=True)]
    except psutil.Error:
        return [me]
