"""python -m bench --boards N: one emulated board alone against N emulated boards in a ring over TCP.

Boards are test hosts (tests/cluster/testhosts.py): a network namespace each on a bridge, its own
address, host name and sshd, and a board's budget: one core of this machine (a cpuset), a memory
limit (--board-memory; over it the kernel kills the rank, as on a board) and a link rate (tc tbf on
both ends of its veth). Both sides serve the same random distilgpt2-shaped weights (bench/prepare.py):

- one board: `python main.py` on board 0, the whole model in one process (a one-stage split);
- N boards: `mpirun` with one rank per board, over TCP, with the settings launch.sh uses
  (shardline/wire.py TCP_MCA, the boards' subnet for btl_tcp/oob_tcp_if_include, main.py's default
  threads: each board's own core).

For each link rate (--rates, default 1gbit then 100mbit, changed on the running boards), streaming
HTTP clients on this machine (bench/load.py) measure: one request at a time (decode tok/s, time to
first token), then 4, 8, 16 and 32 concurrent clients (aggregate tok/s); /metrics between phases gives
the step (ring round trip) time per micro-batch, bytes per hop and peak RSS per board. Writes
results.json, results.md and plot.png in --out (bench/out/boards).

Needs root (namespaces, cgroups, tc) and sshd (tests/cluster/setup_host.sh); otherwise it says why
and exits 0 without measuring. The load generator runs on this machine outside the boards: with as
many boards as cores it shares their cores, which the single board does not have to (reported).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun")
PORT = 8000
BOARD_WEIGHT = 8192                           # cpu.shares of a board (an ordinary process: 1024)
TARGET_AGGREGATE, TARGET_SINGLE = 1.7, 0.9   # issue 11: 2 boards of one core each at 1 Gbit, 32 clients / one request


def rnd(x, nd=2):
    return None if x is None else round(x, nd)


# ---- what runs on the boards ----

def cluster_mpirun(addresses: list[str], parts: Path, port: int, cidr: str, rsh_agent: list[str],
                   serve: tuple[str, ...] = ()) -> list[str]:
    """The mpirun command of ansible/templates/launch.sh.j2, for boards at `addresses` (one slot each).
    rsh_agent: the ssh command (with its options) mpirun starts its daemons with; serve: more main.py options."""
    from shardline import wire
    return [MPIRUN, "--host", ",".join(f"{a}:1" for a in addresses), "-np", str(len(addresses)),
            "--map-by", "node", "--bind-to", "none", "--enable-recovery", "--prefix", str(Path(PY).parent.parent),
            "--wdir", str(ROOT), *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
            "--mca", "plm_rsh_agent", " ".join(rsh_agent), *wire.mca_args(),
            "--mca", "btl_tcp_if_include", cidr, "--mca", "oob_tcp_if_include", cidr,
            "-x", "PATH", "-x", "PYTHONUNBUFFERED=1",
            PY, "-m", "mpi4py", str(ROOT / "main.py"), "--model-dir", str(parts),
            "--host", addresses[0], "--port", str(port), *serve]


CEILING_SCRIPT = r"""
import os, sys, time, torch
from shardline.models.linear import Dense
os.sched_setaffinity(0, {int(sys.argv[1])})
torch.set_num_threads(1)
rows, hidden, start = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
x, f = torch.randn(rows, hidden), Dense(torch.randn(hidden, 4 * hidden), conv1d=True)   # as a GPT-2 stage
for _ in range(20):
    f(x)
while time.time() < start:
    time.sleep(0.001)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    f(x)
    n += 1
print((time.perf_counter() - t0) / n * 1e3)
"""


def core_ceiling(cores: list[int], rows: int, hidden: int, tries: int = 3) -> dict:
    """What N boards could reach on this machine at best: the same fp32 matmul (a board's MLP shape, one
    thread, the stages' own kernel) timed on one core alone, then on all the boards' cores at once. Real boards share nothing;
    cores of one machine (or vCPUs of a VM) may share caches, memory bandwidth, a power budget or a
    physical core, and then each runs slower while the others compute. ceiling = sum over the cores of
    (time alone / time together): the best aggregate N perfectly balanced boards can have here, in units
    of one board."""
    def run(on: list[int]) -> list[float]:
        start = time.time() + 1.5
        procs = [subprocess.Popen([PY, "-c", CEILING_SCRIPT, str(c), str(rows), str(hidden), str(start)],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True) for c in on]
        return [float(p.communicate(timeout=60)[0]) for p in procs]
    # the median of a few tries each: one try is as noisy as this machine
    alone = sorted(run(cores[:1])[0] for _ in range(tries))[tries // 2]
    together = [sorted(col)[tries // 2] for col in zip(*(run(cores) for _ in range(tries)))]
    return {"cores": cores, "shape": [rows, hidden, 4 * hidden], "ms_alone": rnd(alone, 4),
            "ms_together": [rnd(t, 4) for t in together],
            "ceiling": rnd(sum(alone / t for t in together), 2)}


def split_for(hf: Path, stages: int, out: Path, layers: str | None = None) -> Path:
    """hf split into `stages` shards at out (reused when made from the same weights with the same plan)."""
    stamp = {"stages": stages, "layers": layers, "weights": (hf / "config.json").stat().st_mtime}
    try:
        if json.loads((out / "bench-stamp.json").read_text()) == stamp:
            return out
    except (OSError, ValueError):
        pass
    extra = ["--layers", layers] if layers else []
    run = subprocess.run([PY, "-m", "splitter", "--model", str(hf), "--stages", str(stages), "--out", str(out), *extra],
                         cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"python -m splitter --stages {stages} {' '.join(extra)} failed:\n{run.stderr[-2000:]}")
    (out / "bench-stamp.json").write_text(json.dumps(stamp))
    return out


class Served:
    """A server on the boards (one board's `python main.py`, or mpirun over all of them), its URL and log."""

    def __init__(self, hosts, n_boards: int, parts: Path, log: Path, slots: int):
        from tests.cluster import testhosts
        self.hosts, self.head = hosts, hosts.hosts[0]
        self.url = f"http://{self.head.address}:{PORT}"
        self.log_path = log
        self.ranks = n_boards
        self.log = open(log, "w")
        if n_boards == 1:
            self.pid_file = hosts.workdir / "single.pid"
            cmd = (f"echo $$ > {self.pid_file} && cd {shlex.quote(str(ROOT))} && PYTHONUNBUFFERED=1 exec {PY} main.py "
                   f"--model-dir {shlex.quote(str(parts))} --host {self.head.address} --port {PORT} --slots {slots}")
            self.cmd = hosts.ssh_argv(self.head, cmd)
        else:
            self.pid_file = None
            agent = ["ssh", *hosts.ssh_options()]
            self.cmd = cluster_mpirun([h.address for h in hosts.hosts[:n_boards]], parts, PORT, testhosts.CIDR, agent,
                                      ("--slots", str(slots)))
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 240) -> dict:
        from bench.server import wait_healthy
        return wait_healthy(self.proc, self.url, self.log_path, timeout, interval=0.5)

    def stop(self) -> int | None:
        if self.pid_file is not None:   # SIGTERM to main.py on the board: it stops cleanly
            self.hosts.run(self.head, f"test -s {self.pid_file} && kill -TERM $(cat {self.pid_file})", timeout=20)
        elif self.proc.poll() is None:  # SIGTERM to mpirun: it stops every rank
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


# ---- one configuration, measured at every rate ----

def measure(srv: Served, hosts, cfg, prompts: list[str], hidden: int, label: str) -> dict:
    from bench.load import run_level
    from bench.cpu import CpuWatch
    from bench.run import breakdown, summarize, traffic
    from bench.server import fresh_metrics
    watch_ours = ours(hosts)
    res = {"label": label, "boards": srv.ranks, "log": str(srv.log_path), "rates": {}}
    t0 = time.monotonic()
    health = srv.wait_healthy()
    res["startup_s"] = rnd(time.monotonic() - t0, 1)
    res["stages"] = health["stages"]
    for rate in cfg.rates:
        for h in hosts.hosts:
            hosts.set_rate(h, rate)
        print(f"[bench] {label}, {rate} links", flush=True)
        run_level(srv.url, prompts, 1, 1, 8)                                        # warm-up
        run_level(srv.url, prompts, max(cfg.clients), max(cfg.clients), 4)
        levels = {}
        m1 = fresh_metrics(srv.url, srv.ranks)
        for n in cfg.clients:
            m0 = m1
            total = len(prompts) if n == 1 else n * cfg.rounds
            watch = CpuWatch(watch_ours).start()
            runs, wall = run_level(srv.url, prompts, n, total, cfg.max_tokens)
            machine = watch.stop()
            m1 = fresh_metrics(srv.url, srv.ranks)
            ph = summarize(runs, wall)
            ph["machine"] = machine   # foreign_cores: CPU other processes on this machine took meanwhile
            ph["time"] = breakdown(m0, m1, {}, {}, wall, srv.ranks)   # compute ms per micro-batch, per rank
            steps = m1["step_count"] - m0["step_count"]
            ph["step_ms"] = rnd((m1["step_sum"] - m0["step_sum"]) / steps * 1e3 if steps else None)
            ph["traffic"] = traffic(m0, m1, ph, hidden, srv.ranks) if srv.ranks > 1 else None
            ph["metrics_fresh"] = bool(m0.get("fresh") and m1.get("fresh"))
            levels[str(n)] = ph
            print(f"[bench]   {n:2d} client(s): {ph['aggregate_tok_s']} tok/s aggregate, decode {ph['decode_tok_s']} "
                  f"tok/s, TTFT p50 {ph['ttft_ms_p50']} ms, step {ph['step_ms']} ms (compute per rank "
                  f"{[r['compute_ms_per_step'] for r in ph['time']['ranks'].values()]}), errors {ph['errors']}, "
                  f"other processes {machine['foreign_cores']} cores", flush=True)
        res["rates"][rate] = {"levels": levels}
    final = fresh_metrics(srv.url, srv.ranks)
    res["peak_rss_mb"] = {str(r): rnd(v["peak_rss_bytes"] / 2**20, 1) for r, v in sorted(final["ranks"].items())}
    return res


def ours(hosts):
    """The processes whose CPU counts as the benchmark's own: this one and its children (the load
    generator, mpirun, ssh) and everything running on the boards."""
    import psutil

    from bench.cpu import self_and_children

    def procs():
        found = self_and_children()
        for pids in hosts.pids().values():
            for pid in pids:
                try:
                    found.append(psutil.Process(pid))
                except psutil.Error:
                    continue
        return found
    return procs


# ---- table, plot ----

def hop_bytes(level: dict) -> str:
    t = level.get("traffic")
    if not t:
        return "—"
    return " / ".join(f"{h['decode_per_token']:.0f}" for h in t["hops"].values())


def markdown(results: dict) -> str:
    one, many, cfg = results["one_board"], results["boards"], results["config"]
    n = many["boards"]
    rows = [f"| figure | link | one board (1 core, {cfg['board_memory']}) | {n} boards, ring over TCP | × |",
            "|---|---|---|---|---|"]

    def cell(d, key, lv):
        return d["rates"][rate]["levels"][lv].get(key)

    def ratio(a, b):
        return f"**{a / b:.2f}×**" if a and b else "—"
    for rate in cfg["rates"]:
        a, b = cell(one, "decode_tok_s", "1"), cell(many, "decode_tok_s", "1")
        rows.append(f"| one request, decode tok/s | {rate} | {a} | {b} | {ratio(b, a)} |")
        a, b = cell(one, "ttft_ms_p50", "1"), cell(many, "ttft_ms_p50", "1")
        rows.append(f"| one request, time to first token p50, ms | {rate} | {a} | {b} | |")
        for c in cfg["clients"]:
            a, b = cell(one, "aggregate_tok_s", str(c)), cell(many, "aggregate_tok_s", str(c))
            rows.append(f"| aggregate tok/s, {c} client{'s' if c > 1 else ''} | {rate} | {a} | {b} | {ratio(b, a)} |")
        for c in ("1", "16"):
            if c in many["rates"][rate]["levels"]:
                rows.append(f"| step time (ring round trip for {n} boards) per micro-batch, ms, {c} client(s) | {rate} | "
                            f"{cell(one, 'step_ms', c)} | {cell(many, 'step_ms', c)} | |")
        for c in ("1", str(max(cfg["clients"]))):
            lv = many["rates"][rate]["levels"][c]
            rows.append(f"| bytes per token per hop, {c} client(s) (hops {' / '.join(lv['traffic']['hops'])}) | {rate} | "
                        f"— | {hop_bytes(lv)} | |")
        a = max(lv["machine"]["foreign_cores"] for lv in one["rates"][rate]["levels"].values())
        b = max(lv["machine"]["foreign_cores"] for lv in many["rates"][rate]["levels"].values())
        rows.append(f"| other processes on this machine, cores (worst level) | {rate} | {a} | {b} | |")
    rows.append(f"| peak RSS per board, MiB | | {' / '.join(str(v) for v in one['peak_rss_mb'].values())} | "
                f"{' / '.join(str(v) for v in many['peak_rss_mb'].values())} | |")
    c = results.get("ceiling")
    if c:
        rows.append(f"| this machine's ceiling: a {c['shape'][0]}-row matmul per core, ms (alone; all {n} cores at once) | | "
                    f"{c['ms_alone']} | {' / '.join(str(t) for t in c['ms_together'])} | **{c['ceiling']}×** |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg, one, many = results["config"], results["one_board"], results["boards"]
    clients = cfg["clients"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, rate in enumerate(cfg["rates"]):
        style = "-" if i == 0 else "--"
        for d, color, name in ((one, "gray", "one board"), (many, "C0", f"{many['boards']} boards over TCP")):
            ax.plot(clients, [d["rates"][rate]["levels"][str(c)]["aggregate_tok_s"] for c in clients], "o" + style,
                    color=color, label=f"{name}, {rate} link")
    first = cfg["rates"][0]
    base = one["rates"][first]["levels"][str(max(clients))]["aggregate_tok_s"]
    if base:
        ax.axhline(base * TARGET_AGGREGATE, color="red", ls=":", label=f"target: {TARGET_AGGREGATE}× one board at {max(clients)}")
        if results.get("ceiling"):
            ax.axhline(base * results["ceiling"]["ceiling"], color="gray", ls="-.",
                       label=f"this machine's ceiling: {results['ceiling']['ceiling']}× (its cores slow each other)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"Emulated boards (1 core, {cfg['board_memory']} each): one alone vs {many['boards']} in a ring; "
                 f"random distilgpt2-shaped weights", fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ----

def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench --boards N", description=__doc__.split("\n\n")[0])
    ap.add_argument("--boards", type=int, required=True, help="boards in the ring (2 or more)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 prompts, 16 tokens, clients 1,4")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "boards")
    ap.add_argument("--model-dir", type=Path, default=None, help="weights cache (default bench/out/model)")
    ap.add_argument("--clients", default="1,4,8,16,32")
    ap.add_argument("--rates", default="1gbit,100mbit", help="link rates, tc syntax (default 1gbit,100mbit)")
    ap.add_argument("--board-memory", default="2g", help="each board's RAM (default 2g, a 2 GB Raspberry Pi 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (32; quick 16)")
    ap.add_argument("--prompts", type=int, default=None, help="requests one after another for single-request (8; quick 4)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="requests per client at each level above 1 (4, so that a level measures the steady state "
                         "rather than one wave of prefills and its tail; quick 1)")
    ap.add_argument("--slots", type=int, default=None,
                    help="main.py --slots on both sides (default: the largest client count, so that every client is "
                         "served at once rather than queued)")
    ap.add_argument("--board-weight", type=int, default=BOARD_WEIGHT,
                    help=f"each board's cpu.shares against this machine's other processes (default {BOARD_WEIGHT}; "
                         "an ordinary process has 1024, 262144 keeps nearly everything else off the boards' cores)")
    ap.add_argument("--layers", default=None, help="the N boards' layer plan, splitter syntax (e.g. none,0-5); "
                    "default: the splitter's own plan, what users get")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.boards < 2:
        ap.error("--boards: 2 or more (one board alone is always measured beside them)")
    a.max_tokens = a.max_tokens or (16 if a.quick else 32)
    a.prompts = a.prompts or (4 if a.quick else 8)
    a.rounds = a.rounds or (1 if a.quick else 4)
    a.clients = sorted({int(c) for c in ("1,4" if a.quick else a.clients).split(",") if c.strip()} | {1})
    a.slots = a.slots or max(a.clients)
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    from tests.cluster.testhosts import parse_rate, parse_size
    try:
        for r in a.rates:
            parse_rate(r)
        parse_size(a.board_memory)
    except ValueError as err:
        ap.error(str(err))
    return a


def skip_reason() -> str | None:
    from tests.cluster import testhosts
    return testhosts.skip_reason() or testhosts.board_skip_reason()


def main(argv=None) -> int:
    from bench.prompts import PROMPTS
    from bench.run import git_commit, prepare
    from tests.cluster import testhosts
    cfg = parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"[bench] --boards skipped: {reason}", flush=True)
        return 0
    out = cfg.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_run = time.monotonic()
    model_dir = (cfg.model_dir or (ROOT / "bench" / "out" / "model")).resolve()
    prepare(model_dir, cfg.seed)
    hf = model_dir / "hf"
    one_parts = split_for(hf, 1, model_dir / "parts-1")
    many_parts = split_for(hf, cfg.boards, model_dir / f"parts-{cfg.boards}", cfg.layers)
    hidden = json.loads((one_parts / "manifest.json").read_text())["config"]["n_embd"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.prompts)]
    cores = sorted(os.sched_getaffinity(0))
    # Each board's core is its own: a weight of 8 ordinary processes keeps this machine's other work
    # mostly off it (what is left is reported as foreign_cores per phase).
    boards = [testhosts.Board(cpus=str(cores[i % len(cores)]), memory=cfg.board_memory, rate=cfg.rates[0],
                              weight=cfg.board_weight) for i in range(cfg.boards)]
    notes = []
    if cfg.boards > len(cores):
        notes.append(f"{cfg.boards} boards on {len(cores)} cores: boards share cores, the ring is slower than real boards")
    if cfg.boards >= len(cores):
        notes.append("the load generator (this process) shares the boards' cores in the ring runs; "
                     "the single board leaves it a core of its own")
    for n in notes:
        print(f"[bench] note: {n}", flush=True)
    board_cores = sorted({int(b.cpus) for b in boards})
    ceiling = core_ceiling(board_cores, cfg.slots // cfg.boards or 1, hidden, 1 if cfg.quick else 3) if len(board_cores) > 1 else None
    if ceiling:
        print(f"[bench] this machine's ceiling for {len(board_cores)} boards: {ceiling['ceiling']}× one board "
              f"(a {ceiling['shape']} fp32 matmul takes {ceiling['ms_alone']} ms on one core alone, "
              f"{ceiling['ms_together']} ms with every board's core computing at once)", flush=True)
    hosts = testhosts.TestHosts(cfg.boards, shared_paths=[Path(sys.base_prefix), Path(sys.prefix), ROOT], boards=boards)
    results = {}
    try:
        hosts.start()
        for key, n, parts in (("one_board", 1, one_parts), ("boards", cfg.boards, many_parts)):
            label = "one board" if n == 1 else f"{n} boards"
            print(f"[bench] {label}: {boards[0].describe()} each; serving {parts}", flush=True)
            srv = Served(hosts, n, parts, out / "logs" / f"{key}.log", cfg.slots)
            try:
                results[key] = measure(srv, hosts, cfg, prompts, hidden, label)
            finally:
                results.setdefault(key, {})["exit_code"] = srv.stop()
    finally:
        hosts.stop()
    one, many = results["one_board"], results["boards"]
    first, top = cfg.rates[0], str(max(cfg.clients))

    def ratio(key, lv):
        a = one["rates"][first]["levels"][lv][key]
        b = many["rates"][first]["levels"][lv][key]
        return rnd(b / a, 3) if a and b else None
    results["ratios"] = {"single_decode": ratio("decode_tok_s", "1"), f"aggregate_{top}": ratio("aggregate_tok_s", top),
                         "rate": first}
    results["ceiling"] = ceiling
    if ceiling and results["ratios"][f"aggregate_{top}"]:
        results["ratios"][f"aggregate_{top}_of_ceiling"] = rnd(results["ratios"][f"aggregate_{top}"] / ceiling["ceiling"], 3)
    results["targets"] = {"single_decode": TARGET_SINGLE, f"aggregate_{top}": TARGET_AGGREGATE,
                          "applies_to": "2 boards of one core each at 1gbit, 32 clients"}
    results["meta"] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "host": platform.node(),
                       "cores": os.cpu_count(), "python": platform.python_version(), "notes": notes,
                       "seconds": rnd(time.monotonic() - t_run, 1),
                       "model": f"random distilgpt2-shaped weights (seed {cfg.seed})"}
    results["config"] = {"boards": cfg.boards, "board_memory": cfg.board_memory, "board_cpus": [b.cpus for b in boards], "board_weight": cfg.board_weight,
                         "rates": cfg.rates, "clients": cfg.clients, "max_tokens": cfg.max_tokens,
                         "prompts": cfg.prompts, "rounds": cfg.rounds, "slots": cfg.slots, "quick": cfg.quick, "layers": cfg.layers,
                         "mpirun": cluster_mpirun(["BOARD0", "BOARD1"], many_parts, PORT, testhosts.CIDR, ["ssh"])}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "plot.png")
    print()
    print(table)
    print()
    r = results["ratios"]
    print(f"[bench] {cfg.boards} boards vs one at {first}: one request {r['single_decode']}× (target ≥ {TARGET_SINGLE}), "
          f"{top} clients {r[f'aggregate_{top}']}× (target ≥ {TARGET_AGGREGATE}"
          + (f"; this machine's ceiling {ceiling['ceiling']}×" if ceiling else "") + f"); wrote {out / 'results.json'}, "
          f"{out / 'results.md'}, {out / 'plot.png'} in {results['meta']['seconds']}s", flush=True)
    bad = [k for k in ("one_board", "boards") for rate in results[k]["rates"].values()
           for lv in rate["levels"].values() if lv["errors"]]
    return 1 if bad else 0
