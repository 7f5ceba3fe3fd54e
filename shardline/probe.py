"""What this board brings to the ring: python -m shardline.probe [--seconds 3]

Prints one JSON object: the host name, architecture, cores, total and available memory, and the
speed measured for a few seconds with the matmul shapes a stage runs:

- ``gbps``: memory bandwidth, from one token's decode step: a vector times a float32 weight matrix
  much larger than the caches, where every weight is read once (what bounds a CPU board's tok/s);
- ``gflops``: arithmetic, from a batch of 128 rows times a 2048x2048 float32 matrix (prefill and
  batched decode, where the weights stay in cache).

With a CUDA GPU (torch.cuda.is_available()), ``gpu`` holds its name, memory and the same two
figures measured on it. The planner (splitter/boards.py) reads ``memory_mb``: the memory a stage may
use, that is the available memory plus what a shardline rank already running on this board holds
(re-running the plan while the service runs must not shrink it). Inside a cgroup with a memory or
CPU limit (a container, a systemd slice, the emulated boards of the tests) the limit counts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

MB = 2**20
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); {} elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cgroup_dirs(controller: str) -> list[Path]:
    """The cgroup directories above this process for a controller (memory, cpu), innermost first:
    cgroup v2's unified tree, or v1's per-controller tree ([] when neither is there)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, names, rel = line.split(":", 2)
        if controller in names.split(","):          # v1: "4:memory:/path"
            root = CGROUP_ROOT / controller
        elif names == "" and (CGROUP_ROOT / "cgroup.controllers").exists():  # v2: "0::/path"
            root = CGROUP_ROOT
        else:
            continue
        here = root / rel.strip().lstrip("/")
        return [d for d in (here, *here.parents) if d.is_relative_to(root) and d.is_dir()]
    return []


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _limit(raw: str | None) -> int | None:
    """A cgroup memory limit in bytes; None for none ("max" in v2, a huge number in v1)."""
    if not raw or raw == "max" or int(raw) >= 2**62:
        return None
    return int(raw)


def cgroup_limits() -> dict:
    """The tightest memory limit (with what is left under it, page cache counted as free) and CPU
    quota (in cores) of the cgroups above this process, v1 or v2."""
    mem_limit = mem_free = cpu = None
    for d in _cgroup_dirs("memory"):
        v2 = (d / "memory.max").exists()
        limit = _limit(_read(d / ("memory.max" if v2 else "memory.limit_in_bytes")))
        if limit is None:
            continue
        current = int(_read(d / ("memory.current" if v2 else "memory.usage_in_bytes")) or 0)
        stat = dict(line.split()[:2] for line in (_read(d / "memory.stat") or "").splitlines() if " " in line)
        free = limit - current + int(stat.get("inactive_file" if v2 else "total_inactive_file", 0))
        mem_limit = limit if mem_limit is None else min(mem_limit, limit)
        mem_free = free if mem_free is None else min(mem_free, free)
    for d in _cgroup_dirs("cpu"):
        raw = _read(d / "cpu.max")
        if raw is not None:
            quota, period = raw.split()[:2]
        else:
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota in (None, "max", "-1") or period is None:
            continue
        cores = int(quota) / int(period)
        cpu = cores if cpu is None else min(cpu, cores)
    return {"memory_limit": mem_limit, "memory_free": mem_free, "cpu_quota": cpu}


def shardline_ranks() -> dict[int, int]:
    """{pid: RSS bytes} of shardline ranks already running on this board (same UTS namespace, not us)."""
    import psutil
    try:
        own_uts = os.readlink("/proc/self/ns/uts")
    except OSError:
        own_uts = None
    ranks = {}
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        try:
            cmd = proc.info["cmdline"] or []
            if proc.info["pid"] == os.getpid() or "--model-dir" not in cmd:
                continue
            if not any(Path(arg).name == "main.py" for arg in cmd):
                continue
            if own_uts is not None and os.readlink(f"/proc/{proc.info['pid']}/ns/uts") != own_uts:
                continue
            ranks[proc.info["pid"]] = proc.info["memory_info"].rss
        except (OSError, psutil.Error, TypeError, AttributeError):
            continue
    return ranks


def memory() -> dict:
    info = _meminfo()
    if info:
        total, available = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    else:  # not Linux: psutil knows
        import psutil
        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    cg = cgroup_limits()
    if cg["memory_limit"] is not None:
        total = min(total, cg["memory_limit"])
        available = min(available, max(cg["memory_free"], 0))
    running = sum(shardline_ranks().values())
    return {
        "memory_total_mb": round(total / MB, 1),
        "memory_available_mb": round(available / MB, 1),
        "memory_shardline_mb": round(running / MB, 1),
        "memory_mb": round(min(total, available + running) / MB, 1),
        "cpu_quota": cg["cpu_quota"],
    }


def _timed(fn, seconds: float, sync=lambda: None, min_reps: int = 3) -> float:
    """Median seconds per call of fn over about `seconds` (after one warm-up call)."""
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10_000:
            break
    times.sort()
    return times[len(times) // 2]


def measure(device: str, seconds: float, weight_bytes: int) -> dict:
    """GB/s of a decode matvec over a weight of about weight_bytes, and GFLOP/s of a 128-row matmul."""
    import torch
    import torch.nn.functional as F
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cols = 4096
    rows = max(256, weight_bytes // (4 * cols))
    with torch.inference_mode():
        w = torch.randn(rows, cols, device=device) * 0.01    # (rows, cols) fp32: a layer's weight
        x = torch.randn(1, cols, device=device)                # (1, cols): one token's hidden state
        t = _timed(lambda: F.linear(x, w), seconds / 2, sync)
        gbps = w.numel() * 4 / t / 1e9
        del w, x
        n = 2048 if device == "cpu" else 8192
        w = torch.randn(n, n, device=device) * 0.01            # (n, n)
        x = torch.randn(128 if device == "cpu" else 4096, n, device=device)  # (batch, n)
        t = _timed(lambda: F.linear(x, w), seconds / 2, sync)
        gflops = 2 * x.shape[0] * n * n / t / 1e9
    return {"gbps": round(gbps, 2), "gflops": round(gflops, 1)}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def probe(seconds: float = 3.0, gpu: bool = True, name: str | None = None) -> dict:
    import torch
    mem = memory()
    cores = cpu_count()
    threads = max(1, min(cores, int(mem["cpu_quota"] or cores) or 1))
    torch.set_num_threads(threads)
    # Big enough to leave the caches (64 MB), small enough for a 1 GB board under load.
    weight = int(min(64 * MB, max(8 * MB, mem["memory_available_mb"] * MB / 8)))
    out = {
        "name": name or socket.gethostname(),
        "host": socket.gethostname(),
        "arch": platform.machine(),
        "system": platform.system(),
        "cores": cores,
        "cpu_quota": mem.pop("cpu_quota"),
        **mem,
        "threads": threads,
        **measure("cpu", seconds, weight),
        "dtype": "float32",
        "torch": torch.__version__,
        "gpu": None,
    }
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        speed = measure("cuda:0", seconds, int(min(1024 * MB, free / 4)))
        out["gpu"] = {"name": props.name, "memory_mb": round(total / MB, 1),
                      "memory_available_mb": round(free / MB, 1), **speed}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardline.probe", description=__doc__.split("\n\n")[1])
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="time spent measuring speed, per device (default 3; the figures settle after about 1)")
    ap.add_argument("--no-gpu", action="store_true", help="do not look for a CUDA GPU")
    ap.add_argument("--name", help="the board's name in the boards file (default: the host name; Ansible "
                                   "passes the inventory name)")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    json.dump(probe(args.seconds, gpu=not args.no_gpu, name=args.name), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
