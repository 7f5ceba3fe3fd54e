"""Boards and the plan that fits them: which board runs which layers, checked against memory.

A boards file (YAML) lists the boards in ring order, the head (rank 0, the HTTP API) first. The
Ansible `plan` tag writes it from `python -m shardline.probe` on every board; people may write it by
hand:

    - name: pi5            # required, unique
      memory_mb: 7800      # required: what a stage may use (the probe's available memory)
      gbps: 8.5            # optional: memory GB/s     } or `speed: 2` (relative: 2 = twice a
      gflops: 30           # optional: float32 GFLOP/s } Raspberry Pi 4, NOMINAL below)
    - name: laptop
      memory_mb: 14000
      gpu: {name: GTX 1060, memory_mb: 6144, gbps: 150, gflops: 3500}   # optional: a CUDA GPU

make_plan() gives each board a contiguous range of layers (the head also holds the embeddings,
the final norm and the LM head) such that every board's shard + KV cache + runtime stays within its
memory less a headroom, and the time per token of one request — the sum of the stage times (bytes
read / GB/s or flops / GFLOP/s, whichever bounds) and of the hops — is least. Among plans within
BALANCE_TOLERANCE of that least time it takes the one whose slowest stage is fastest (that stage
bounds the aggregate tok/s of many requests), so equal boards share the layers evenly. A board that
would slow a token down more than it helps gets no layers and is left out, with the reason. When
nothing fits, DoesNotFit says how much memory is missing and what would make it fit.
"""
from __future__ import annotations

import bisect
import difflib
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from splitter.plan import check_cover

MB = 2**20
# Speed assumed when a boards file has none at all: a Raspberry Pi 4 running float32 matmuls.
NOMINAL = {"gbps": 4.0, "gflops": 20.0}
HOP_LATENCY_S = 0.25e-3          # one small MPI message over TCP on a wired LAN
CUDA_HOST_MB = 600               # host memory a CUDA rank needs beyond the CPU runtime (libraries, context)
CUDA_DEVICE_MB = 400             # GPU memory the CUDA context and the caching allocator keep
BALANCE_TOLERANCE = 0.05         # a plan may be this much slower per token to have a faster slowest stage
# The previous plan (make_plan's `previous`) is kept while it fits and is at most this much slower per
# token than the best plan for the boards' new figures: the probe's speeds vary by a few percent from run
# to run (a board warm, a board serving), which would otherwise move layers between boards, and every
# move re-splits the model on the head and copies the shards to the boards again.
KEEP_TOLERANCE = 0.10

_BOARD_KEYS = {"name", "memory_mb", "memory_gb", "gflops", "gbps", "speed", "gpu", "arch", "cores"}
# What the probe writes besides; kept in the file for people, ignored by the plan.
_INFO_KEYS = {"host", "system", "memory_total_mb", "memory_available_mb", "memory_shardline_mb", "cpu_quota",
              "threads", "dtype", "torch"}
_GPU_KEYS = {"name", "memory_mb", "memory_available_mb", "gflops", "gbps"}


@dataclass
class Board:
    name: str
    memory_mb: float                  # memory a stage may use on this board (host memory)
    gflops: float | None = None       # float32 GFLOP/s measured by the probe; None: not measured
    gbps: float | None = None         # memory GB/s measured by the probe; None: not measured
    gpu: dict | None = None           # {"name", "memory_mb", "gflops", "gbps"} of a CUDA GPU the stage runs on
    arch: str | None = None
    cores: int | None = None


@dataclass
class ModelCost:
    n_layers: int
    layer_bytes: list[int]            # bytes a rank holds for each layer (after quantization; split.held_bytes)
    layer_flops: list[float]          # multiply-adds * 2 per token per layer
    kv_bytes_per_token: list[int]     # KV-cache bytes per token per layer (k and v, all kv heads)
    first_bytes: int                  # stage 0's bytes besides layers: embeddings, final norm, LM head
    first_flops: float                # per token: the LM head (+ norm)
    hidden_bytes: int                 # one hidden vector on the wire (a hop)
    # Bytes stage 0 reads per token (the LM head; an embedding lookup reads one row). None: estimated
    # from first_flops at the layers' bytes per weight, at most first_bytes.
    head_read_bytes: int | None = None
    # The largest single tensor of the head's extras (embeddings, LM head) and of a layer: a GPU rank
    # loads its shard a tensor at a time through host memory (shardline/models/linear.read_shard).
    first_tensor_bytes: int = 0
    layer_tensor_bytes: int = 0
    # Quantized shards: the int8/int4 kernels are CPU kernels, so a board with a GPU computes on its CPU.
    cpu_only: bool = False


@dataclass
class StagePlan:
    board: str
    layers: tuple[int, int]           # [first, end)
    shard_mb: float
    kv_mb: float
    est_ms: float                     # this stage's time for one token of one request
    memory_mb: float = 0.0            # the memory the stage's weights and cache go in (GPU memory on a GPU)
    use_mb: float = 0.0               # shard + KV cache + runtime, against memory_mb * (1 - headroom)
    device: str = "cpu"
    gbps: float = 0.0
    gflops: float = 0.0
    speed_assumed: bool = False       # the board's speed was not measured


class DoesNotFit(ValueError):
    """The model does not fit the boards; the message has the figures and the options.
    needed_mb / have_mb: the memory needed and what the boards have (after headroom);
    options: [{"option": "--quantize int8", "fits": True, "detail": "..."}, ...]."""

    def __init__(self, message: str, needed_mb: float = 0.0, have_mb: float = 0.0, options: list | None = None):
        super().__init__(message)
        self.needed_mb, self.have_mb, self.options = needed_mb, have_mb, options or []


class BoardsFileError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# The boards file

def _number(value, where: str, key: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BoardsFileError(f"{where}: {key} must be a number, not {value!r}")
    if positive and value <= 0:
        raise BoardsFileError(f"{where}: {key} must be above 0, not {value!r}")
    return float(value)


def _unknown(keys, known: set[str], where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(sorted(known))}"
            raise BoardsFileError(f"{where}: unknown field {key!r}{hint}")


def load_boards(path) -> list[Board]:
    """Read a boards file: a YAML list of boards in ring order, the head first."""
    import yaml
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise BoardsFileError(f"{path}: cannot read the boards file: {err.strerror or err}") from None
    try:
        data, root = yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise BoardsFileError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, list) or not data:
        raise BoardsFileError(f"{path}: expected a list of boards (`- name: pi1` / `  memory_mb: 3800`), "
                              "head first, got " + ("nothing" if not data else type(data).__name__))
    boards, seen = [], {}
    for i, (item, node) in enumerate(zip(data, root.value)):
        where = f"{path}:{node.start_mark.line + 1}: board {i + 1}"
        if not isinstance(item, dict):
            raise BoardsFileError(f"{where}: expected `name:` and `memory_mb:` fields, got {item!r}")
        if "name" not in item or not isinstance(item["name"], (str, int)) or str(item["name"]).strip() == "":
            raise BoardsFileError(f"{where}: a board needs a name (the inventory name, e.g. `name: pi1`)")
        name = str(item["name"])
        where += f" ({name})"
        _unknown(item, _BOARD_KEYS | _INFO_KEYS, where)
        if name in seen:
            raise BoardsFileError(f"{where}: the name {name!r} is already board {seen[name]}'s; names must differ")
        seen[name] = i + 1
        if "memory_mb" in item:
            memory = _number(item["memory_mb"], where, "memory_mb")
        elif "memory_gb" in item:
            memory = _number(item["memory_gb"], where, "memory_gb") * 1024
        else:
            raise BoardsFileError(f"{where}: memory_mb is missing (the memory a stage may use, in MB)")
        gbps = _number(item["gbps"], where, "gbps") if item.get("gbps") is not None else None
        gflops = _number(item["gflops"], where, "gflops") if item.get("gflops") is not None else None
        speed = item.get("speed")
        if speed is not None:
            if isinstance(speed, dict):
                _unknown(speed, {"gbps", "gflops"}, where + " speed")
                gbps = _number(speed["gbps"], where, "speed.gbps") if "gbps" in speed else gbps
                gflops = _number(speed["gflops"], where, "speed.gflops") if "gflops" in speed else gflops
            else:
                factor = _number(speed, where, "speed (relative to a Raspberry Pi 4)")
                gbps, gflops = NOMINAL["gbps"] * factor, NOMINAL["gflops"] * factor
        gpu = item.get("gpu")
        if gpu is not None:
            if not isinstance(gpu, dict) or "memory_mb" not in gpu:
                raise BoardsFileError(f"{where}: gpu needs at least memory_mb (and name, gbps, gflops), got {gpu!r}")
            _unknown(gpu, _GPU_KEYS, where + " gpu")
            gpu = {"name": str(gpu.get("name", "CUDA GPU")),
                   "memory_mb": _number(gpu["memory_mb"], where, "gpu.memory_mb"),
                   "gbps": _number(gpu["gbps"], where, "gpu.gbps") if gpu.get("gbps") is not None else None,
                   "gflops": _number(gpu["gflops"], where, "gpu.gflops") if gpu.get("gflops") is not None else None}
        cores = item.get("cores")
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
            raise BoardsFileError(f"{where}: cores must be a whole number above 0, not {cores!r}")
        arch = item.get("arch")
        boards.append(Board(name=name, memory_mb=memory, gflops=gflops, gbps=gbps, gpu=gpu,
                            arch=str(arch) if arch is not None else None, cores=cores))
    return boards


def board_from_probe(name: str, probe: dict) -> Board:
    """A Board from `python -m shardline.probe`'s JSON."""
    gpu = probe.get("gpu")
    if gpu:
        gpu = {k: gpu.get(k) for k in ("name", "memory_mb", "gbps", "gflops")}
    return Board(name=name, memory_mb=float(probe["memory_mb"]), gflops=probe.get("gflops"),
                 gbps=probe.get("gbps"), gpu=gpu, arch=probe.get("arch"), cores=probe.get("cores"))


# ---------------------------------------------------------------------------------------------
# The plan

@dataclass
class Plan:
    stages: list[StagePlan]
    left_out: list[tuple[str, str]]   # (board, reason)
    est_single_tok_s: float
    est_aggregate_tok_s: float
    slots: int = 1
    max_context: int = 0
    hop_ms: float = 0.0
    est_ms_per_token: float = 0.0
    headroom: float = 0.1
    runtime_mb: float = 350.0
    notes: list[str] = field(default_factory=list)

    def layer_ranges(self) -> list[tuple[int, int]]:
        return [s.layers for s in self.stages]

    def layers_spec(self) -> str:
        """The plan in the splitter's --layers syntax (inclusive ranges; none for a stage without layers)."""
        return ",".join(f"{a}-{b - 1}" if b > a else "none" for a, b in self.layer_ranges())

    def to_json(self) -> dict:
        return {
            "stages": [{"board": s.board, "layers": [s.layers[0], s.layers[1]], "shard_mb": round(s.shard_mb, 1),
                        "kv_mb": round(s.kv_mb, 1), "est_ms": round(s.est_ms, 3), "device": s.device,
                        "memory_mb": round(s.memory_mb, 1), "use_mb": round(s.use_mb, 1),
                        "speed_assumed": s.speed_assumed} for s in self.stages],
            "left_out": [{"board": b, "reason": r} for b, r in self.left_out],
            "layers_spec": self.layers_spec(),
            "est_single_tok_s": round(self.est_single_tok_s, 2),
            "est_aggregate_tok_s": round(self.est_aggregate_tok_s, 2),
            "est_ms_per_token": round(self.est_ms_per_token, 3),
            "hop_ms": round(self.hop_ms, 3),
            "slots": self.slots, "max_context": self.max_context,
            "headroom": self.headroom, "runtime_mb": self.runtime_mb,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        head = ("board", "device", "memory MB", "GB/s", "GFLOP/s", "layers", "shard MB", "KV MB", "use MB", "est ms")
        rows = []
        for k, s in enumerate(self.stages):
            a, b = s.layers
            layers = (f"{a}-{b - 1}" if b > a else "none") + (" +emb/head" if k == 0 else "")
            star = "*" if s.speed_assumed else ""
            rows.append((s.board, s.device, f"{s.memory_mb:.0f}", f"{s.gbps:.1f}{star}", f"{s.gflops:.0f}{star}",
                         layers, f"{s.shard_mb:.1f}", f"{s.kv_mb:.1f}", f"{s.use_mb:.0f}", f"{s.est_ms:.2f}"))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        left = {0, 1, 5}
        fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        slowest = max(self.stages, key=lambda s: s.est_ms)
        hops = len(self.stages) if len(self.stages) > 1 else 0
        lines.append("")
        lines.append(f"estimated: {self.est_single_tok_s:.1f} tok/s for one request ({self.est_ms_per_token:.1f} ms "
                     f"per token: stages + {hops} hops of {self.hop_ms:.2f} ms); {self.est_aggregate_tok_s:.1f} tok/s "
                     f"aggregate over {self.slots} slots (slowest stage: {slowest.board})")
        lines.append(f"memory: use MB = shard + KV cache ({self.slots} slots x {self.max_context} tokens) + runtime "
                     f"{self.runtime_mb:.0f} MB, within memory less {self.headroom:.0%} headroom")
        for board, reason in self.left_out:
            lines.append(f"left out: {board}: {reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _Res:
    """A board as the planner sees it."""
    name: str
    budget: float          # bytes for shard + KV cache (after headroom, runtime, CUDA overheads)
    usable_mb: float       # memory shown in the table (GPU memory on a GPU)
    gbps: float
    gflops: float
    device: str
    assumed: bool
    host_short: str = ""   # a GPU board whose host memory cannot load a stage: what it lacks


def _resources(boards: list[Board], runtime_mb: float, headroom: float,
               cost: ModelCost) -> tuple[list[_Res], list[str]]:
    notes, measured = [], []
    gpus = [b for b in boards if b.gpu] if not cost.cpu_only else []
    if cost.cpu_only and any(b.gpu for b in boards):
        notes.append(f"quantized shards run on the CPU kernels: {', '.join(b.name for b in boards if b.gpu)} "
                     "compute on their CPU and hold their stage in host memory, not on the GPU")
    for b in boards:
        src = b.gpu if b in gpus else {"gbps": b.gbps, "gflops": b.gflops}
        if src.get("gbps") and src.get("gflops"):
            measured.append((src["gbps"], src["gflops"]))
    if measured:
        fill = {"gbps": statistics.median(m[0] for m in measured), "gflops": statistics.median(m[1] for m in measured)}
    else:
        fill = dict(NOMINAL)
    res = []
    unmeasured = []
    for k, b in enumerate(boards):
        keep, short = 1.0 - headroom, ""
        if b in gpus:
            largest = max(cost.layer_tensor_bytes, cost.first_tensor_bytes if k == 0 else 0) / MB
            host_need = runtime_mb + CUDA_HOST_MB + largest
            host_ok = b.memory_mb * keep >= host_need
            if not host_ok:
                short = (f"too little host memory for a GPU rank: it needs {host_need:.0f} MB of host memory (runtime "
                         f"{runtime_mb:.0f} MB, CUDA {CUDA_HOST_MB} MB, its largest tensor {largest:.0f} MB on the way "
                         f"to the GPU), it has {b.memory_mb:.0f} MB less {headroom:.0%} headroom")
            budget = (b.gpu["memory_mb"] * keep - CUDA_DEVICE_MB) * MB if host_ok else -1.0
            src, device, usable = b.gpu, "cuda", b.gpu["memory_mb"]
        else:
            budget = (b.memory_mb * keep - runtime_mb) * MB
            src, device, usable = {"gbps": b.gbps, "gflops": b.gflops}, "cpu", b.memory_mb
        assumed = not (src.get("gbps") and src.get("gflops"))
        if assumed:
            unmeasured.append(b.name)
        res.append(_Res(b.name, budget, usable, src.get("gbps") or fill["gbps"], src.get("gflops") or fill["gflops"],
                        device, assumed, short))
    if unmeasured and measured:
        notes.append(f"speed not measured for {', '.join(unmeasured)}: assumed equal to the others' median "
                     f"({fill['gbps']:.1f} GB/s, {fill['gflops']:.0f} GFLOP/s), marked *")
    elif unmeasured:
        notes.append(f"no board has a measured speed: all are taken as equal, and the estimates assume a Raspberry "
                     f"Pi 4 ({NOMINAL['gbps']:.0f} GB/s, {NOMINAL['gflops']:.0f} GFLOP/s), marked *; run the probe "
                     "(ansible --tags plan) for real figures")
    return res, notes


class _Model:
    """Prefix sums of a ModelCost for O(1) stage figures."""

    def __init__(self, cost: ModelCost, slots: int, max_context: int):
        n = cost.n_layers
        for name in ("layer_bytes", "layer_flops", "kv_bytes_per_token"):
            if len(getattr(cost, name)) != n:
                raise ValueError(f"ModelCost.{name} has {len(getattr(cost, name))} entries for {n} layers")
        if n < 1:
            raise ValueError("ModelCost.n_layers must be at least 1")
        self.cost, self.n = cost, n
        self.lb, self.lf, self.kv = [0.0], [0.0], [0.0]
        for i in range(n):
            self.lb.append(self.lb[-1] + cost.layer_bytes[i])
            self.lf.append(self.lf[-1] + cost.layer_flops[i])
            self.kv.append(self.kv[-1] + cost.kv_bytes_per_token[i])
        self.kv_tokens = slots * max_context          # KV rows allocated per layer
        self.ctx_read = max_context / 2                # estimates: decode halfway through a full context
        if cost.head_read_bytes is not None:
            self.head_read = float(cost.head_read_bytes)
        else:
            per_weight = self.lb[n] / (self.lf[n] / 2) if self.lf[n] > 0 else 4.0
            self.head_read = min(float(cost.first_bytes), cost.first_flops / 2 * per_weight)

    def memory(self, a: int, b: int, head: bool) -> tuple[float, float]:
        """(shard bytes, KV-cache bytes) of layers [a, b) (+ embeddings and head on the head)."""
        return (self.lb[b] - self.lb[a] + (self.cost.first_bytes if head else 0),
                self.kv_tokens * (self.kv[b] - self.kv[a]))

    def seconds(self, r: _Res, a: int, b: int, head: bool, batch: int = 1) -> float:
        read = self.lb[b] - self.lb[a] + (self.head_read if head else 0) + batch * self.ctx_read * (self.kv[b] - self.kv[a])
        flops = batch * (self.lf[b] - self.lf[a] + (self.cost.first_flops if head else 0))
        return max(read / (r.gbps * 1e9), flops / (r.gflops * 1e9))


_INF = (math.inf, math.inf)


def _solve(m: _Model, res: list[_Res], hop: float, cap: float = math.inf, force: frozenset = frozenset()):
    """Least (sum of stage seconds + hops, sum of squared stage seconds) with every stage within `cap`
    seconds and its board's memory; workers take >= 1 layer or are skipped (never those in `force`).
    Returns (score, ranges per board with None for skipped) or (_INF, None)."""
    n, R = m.n, len(res)
    best = [[_INF] * (n + 1) for _ in range(R + 1)]
    take = [[None] * (n + 1) for _ in range(R + 1)]
    best[R][n] = (0.0, 0.0)
    for r in range(R - 1, 0, -1):
        for j in range(n, -1, -1):
            if r not in force:
                best[r][j], take[r][j] = best[r + 1][j], None
            for k in range(j + 1, n + 1):
                shard, kv = m.memory(j, k, False)
                if shard + kv > res[r].budget:
                    break
                t = m.seconds(res[r], j, k, False)
                if t > cap:
                    break
                rest = best[r + 1][k]
                if rest[0] == math.inf:
                    continue
                cand = (t + hop + rest[0], t * t + rest[1])
                if cand < best[r][j]:
                    best[r][j], take[r][j] = cand, k
    score, k0 = _INF, None
    for k in range(0, n + 1):
        shard, kv = m.memory(0, k, True)
        if shard + kv > res[0].budget:
            break
        t = m.seconds(res[0], 0, k, True)
        if t > cap:
            break
        rest = best[1][k] if R > 1 else ((0.0, 0.0) if k == n else _INF)
        if rest[0] == math.inf:
            continue
        cand = (t + rest[0] + (hop if k < n else 0.0), t * t + rest[1])
        if cand < score:
            score, k0 = cand, k
    if k0 is None:
        return _INF, None
    ranges, j = [(0, k0)], k0
    for r in range(1, R):
        k = take[r][j]
        ranges.append(None if k is None else (j, k))
        j = k if k is not None else j
    return score, ranges


def _hop_seconds(cost: ModelCost, link_gbps: float) -> float:
    return HOP_LATENCY_S + cost.hidden_bytes * 8 / (link_gbps * 1e9)


def _aggregate_tok_s(m: _Model, res_used: list[_Res], ranges: list[tuple[int, int]], slots: int, hop: float) -> float:
    """Many requests: `slots` sequences in one micro-batch per stage, all stages busy; the slowest
    stage passes every micro-batch once per round, and one micro-batch goes round the ring per round."""
    p = len(ranges)
    per_mb = max(1, math.ceil(slots / p))
    times = [m.seconds(r, a, b, k == 0, batch=per_mb) for k, (r, (a, b)) in enumerate(zip(res_used, ranges))]
    round_s = max(p * max(times), sum(times) + (p * hop if p > 1 else 0.0))
    return p * per_mb / round_s


def _build(m: _Model, res: list[_Res], ranges, hop: float, slots: int, max_context: int, runtime_mb: float,
           headroom: float, notes: list[str], left_out: list[tuple[str, str]]) -> Plan:
    stages, used = [], []
    for r, rng in zip(res, ranges):
        if rng is None:
            continue
        a, b = rng
        shard, kv = m.memory(a, b, not stages)
        overhead = runtime_mb if r.device == "cpu" else CUDA_DEVICE_MB
        stages.append(StagePlan(board=r.name, layers=(a, b), shard_mb=shard / MB, kv_mb=kv / MB,
                                est_ms=m.seconds(r, a, b, not stages) * 1e3, memory_mb=r.usable_mb,
                                use_mb=(shard + kv) / MB + overhead, device=r.device, gbps=r.gbps,
                                gflops=r.gflops, speed_assumed=r.assumed))
        used.append(r)
    hops = len(stages) if len(stages) > 1 else 0
    total = sum(s.est_ms for s in stages) / 1e3 + hops * hop
    agg = _aggregate_tok_s(m, used, [s.layers for s in stages], slots, hop)
    notes = list(notes) + [f"estimates are for decoding halfway through a {max_context}-token context"]
    return Plan(stages=stages, left_out=left_out, est_single_tok_s=1.0 / total, est_aggregate_tok_s=agg,
                slots=slots, max_context=max_context, hop_ms=hop * 1e3, est_ms_per_token=total * 1e3,
                headroom=headroom, runtime_mb=runtime_mb, notes=notes)


def _left_out_reason(m: _Model, res: list[_Res], r: int, hop: float, plan_s: float, used: list[int],
                     runtime_mb: float) -> str:
    board = res[r]
    if board.host_short:
        return board.host_short
    one_layer = min(sum(m.memory(i, i + 1, False)) for i in range(m.n))
    if board.budget < one_layer:
        need = one_layer / MB + (runtime_mb if board.device == "cpu" else CUDA_DEVICE_MB)
        return (f"too little memory: one layer with its KV cache and the runtime needs {need:.0f} MB, "
                f"it has {board.usable_mb:.0f} MB less headroom")
    score, _ = _solve(m, res, hop, force=frozenset([r]))
    if score[0] == math.inf:
        return "no plan that fits the other boards' memory can give it layers"
    delta = (score[0] - plan_s) * 1e3
    per_layer = lambda x: m.seconds(x, 0, m.n, False) / m.n
    others = statistics.median(per_layer(res[u]) for u in used)
    if per_layer(board) > others * 1.2:
        return f"too slow to help: with layers on it, a token takes at least {delta:.1f} ms more than without it"
    return (f"not needed: the model fits the other boards, and with layers on it (one more hop of {hop * 1e3:.2f} ms) "
            f"a token takes at least {delta:.2f} ms more")


def make_plan(boards, cost: ModelCost, slots: int, max_context: int, runtime_mb: float = 350, headroom: float = 0.1,
              link_gbps: float = 1.0, layers_override=None, quant_options: dict[str, ModelCost] | None = None,
              previous: dict[str, tuple[int, int] | None] | None = None) -> Plan:
    """Plan the stages over `boards` (ring order, the head first). See the module docstring.

    layers_override: [first, end) ranges, one per board in order (an empty range on a worker leaves
    it out; boards after the last range are left out); checked against memory like a plan.
    quant_options: {"int8": cost, "int4": cost} offered in DoesNotFit's message when nothing fits.
    previous: the last plan's {board: [first, end), or None for a board it left out}; kept when it was
    made for these boards, still fits them and is within KEEP_TOLERANCE of the best plan's time per
    token (see KEEP_TOLERANCE).
    """
    boards = list(boards)
    if not boards:
        raise ValueError("no boards: the boards file must list at least the head")
    if slots < 1 or max_context < 1:
        raise ValueError(f"slots ({slots}) and max_context ({max_context}) must be at least 1")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom {headroom} must be in [0, 1)")
    if link_gbps <= 0:
        raise ValueError(f"link_gbps {link_gbps} must be above 0")
    m = _Model(cost, slots, max_context)
    res, notes = _resources(boards, runtime_mb, headroom, cost)
    hop = _hop_seconds(cost, link_gbps)
    args = dict(slots=slots, max_context=max_context, runtime_mb=runtime_mb, headroom=headroom)

    if layers_override is not None:
        ranges = _check_override(layers_override, m.n, boards)
        ranges += [None] * (len(boards) - len(ranges))
        left_out = [(b.name, "no layers in --layers") for b, rng in zip(boards, ranges) if rng is None]
        over = []
        for k, (r, rng) in enumerate(zip(res, ranges)):
            if rng is not None and r.host_short:
                over.append(f"{r.name} (layers {rng[0]}-{rng[1] - 1}): {r.host_short}")
            elif rng is not None and sum(m.memory(*rng, k == 0)) > r.budget:
                shard, kv = m.memory(*rng, k == 0)
                over.append(f"{r.name} (layers {rng[0]}-{rng[1] - 1}): shard {shard / MB:.0f} MB + KV cache "
                            f"{kv / MB:.0f} MB + runtime needs more than its {r.usable_mb:.0f} MB less "
                            f"{headroom:.0%} headroom (room for {max(r.budget, 0) / MB:.0f} MB of shard and cache)")
        if over:
            raise DoesNotFit("the --layers override does not fit:\n  " + "\n  ".join(over))
        return _build(m, res, ranges, hop, **args, notes=notes + ["layers set by hand (--layers)"], left_out=left_out)

    best, ranges = _solve(m, res, hop)
    if ranges is None:
        raise _refusal(boards, cost, m, res, hop, slots, max_context, runtime_mb, headroom, link_gbps, quant_options)
    # The fastest slowest stage among plans within BALANCE_TOLERANCE of the least time per token.
    limit = best[0] * (1 + BALANCE_TOLERANCE) + 1e-12
    caps = sorted({m.seconds(r, a, b, k == 0) for k, r in enumerate(res)
                   for a in ([0] if k == 0 else range(m.n)) for b in range(a + (k > 0), m.n + 1)
                   if sum(m.memory(a, b, k == 0)) <= r.budget})
    lo, hi = 0, bisect.bisect_right(caps, max(m.seconds(r, *rng, k == 0) for k, (r, rng) in
                                              enumerate(zip(res, ranges)) if rng is not None)) - 1
    chosen = (best, ranges)
    while lo <= hi:
        mid = (lo + hi) // 2
        score, rngs = _solve(m, res, hop, cap=caps[mid] * (1 + 1e-12))
        if score[0] <= limit:
            chosen, hi = (score, rngs), mid - 1
        else:
            lo = mid + 1
    score, ranges = chosen
    # Equal boards share the work: a board left out joins when that keeps the slowest stage and the
    # time per token within the same bounds (it only adds a hop, and spreads memory and heat).
    cap = max(m.seconds(r, *rng, k == 0) for k, (r, rng) in enumerate(zip(res, ranges)) if rng is not None)
    force = frozenset()
    for k in range(1, len(res)):
        if ranges[k] is None:
            trial = _solve(m, res, hop, cap=cap * (1 + 1e-12), force=force | {k})
            if trial[0][0] <= limit:
                force, (score, ranges) = force | {k}, trial
    kept = _previous_ranges(previous, m, res) if previous else None
    if kept is not None:
        then, now = _seconds_per_token(m, res, kept, hop), _seconds_per_token(m, res, ranges, hop)
        if then <= now * (1 + KEEP_TOLERANCE):
            if kept != ranges:
                notes = notes + [f"kept the previous plan: {(then / now - 1) * 100:.1f} % slower per token than the "
                                 f"best for these figures (re-plans past {KEEP_TOLERANCE:.0%})"]
            ranges = kept
    used = [k for k, rng in enumerate(ranges) if rng is not None]
    left_out = [(res[k].name, _left_out_reason(m, res, k, hop, best[0], used, runtime_mb))
                for k, rng in enumerate(ranges) if rng is None]
    return _build(m, res, ranges, hop, **args, notes=notes, left_out=left_out)


def _previous_ranges(previous: dict[str, tuple[int, int] | None], m: _Model, res: list[_Res]):
    """The previous plan as ranges per board of res (None where a board had no stage), or None when it
    cannot stand: it was made for other boards (one added, gone or renamed: the user changed the
    cluster, so it is planned afresh), leaves out the head, does not cover the layers in ring order, or
    a stage no longer fits its board's memory."""
    names = [r.name for r in res]
    if set(previous) != set(names) or previous[names[0]] is None:
        return None
    ranges = [None if previous[n] is None else tuple(previous[n]) for n in names]
    end = 0
    for k, (r, rng) in enumerate(zip(res, ranges)):
        if rng is None:
            continue
        a, b = rng
        if a != end or b < a or (b == a and k > 0) or sum(m.memory(a, b, k == 0)) > r.budget:
            return None
        end = b
    return ranges if end == m.n else None


def _seconds_per_token(m: _Model, res: list[_Res], ranges, hop: float) -> float:
    stages = [m.seconds(r, *rng, k == 0) for k, (r, rng) in enumerate(zip(res, ranges)) if rng is not None]
    return sum(stages) + (len(stages) * hop if len(stages) > 1 else 0)


def _check_override(layers, n: int, boards: list[Board]) -> list[tuple[int, int]]:
    ranges = [tuple(int(x) for x in rng) for rng in layers]
    if len(ranges) > len(boards):
        raise ValueError(f"--layers gives {len(ranges)} stages for {len(boards)} boards")
    check_cover(ranges, n, f"--layers {ranges}")
    return [rng if k == 0 or rng[1] > rng[0] else None for k, rng in enumerate(ranges)]


# ---------------------------------------------------------------------------------------------
# What does not fit

def _fits(boards, cost, slots, ctx, runtime_mb, headroom, link_gbps) -> Plan | None:
    m = _Model(cost, slots, ctx)
    res, notes = _resources(boards, runtime_mb, headroom, cost)
    hop = _hop_seconds(cost, link_gbps)
    _, ranges = _solve(m, res, hop)
    if ranges is None:
        return None
    return _build(m, res, ranges, hop, slots, ctx, runtime_mb, headroom, notes, [])


def _largest_fitting(lo: int, hi: int, ok) -> int | None:
    """The largest x in [lo, hi] with ok(x), ok monotone (True below some point); None if none."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _refusal(boards, cost, m: _Model, res, hop, slots, max_context, runtime_mb, headroom, link_gbps,
             quant_options) -> DoesNotFit:
    shard_mb = (m.lb[m.n] + cost.first_bytes) / MB
    kv_mb = m.kv_tokens * m.kv[m.n] / MB
    # a GPU board holds its stage in GPU memory; its host memory holds the runtime
    runtime_total = sum(CUDA_DEVICE_MB if r.device == "cuda" else runtime_mb for r in res if not r.host_short)
    needed = shard_mb + kv_mb + runtime_total
    have = sum(r.usable_mb * (1 - headroom) for r in res if not r.host_short)
    lines = [f"the model does not fit these {len(boards)} boards: it needs about {needed:.0f} MB "
             f"(weights {shard_mb:.0f} MB as held in memory, of which embeddings and head {cost.first_bytes / MB:.0f} MB; KV cache "
             f"{kv_mb:.0f} MB for {slots} slots x {max_context} tokens; runtime {runtime_mb:.0f} MB per board"
             f"{f', {CUDA_DEVICE_MB} MB of a GPU' if any(r.device == 'cuda' for r in res) else ''}), "
             f"and the boards have {have:.0f} MB after {headroom:.0%} headroom"]
    lines += [f"{r.name}: {r.host_short}" for r in res if r.host_short]
    if res[0].budget < cost.first_bytes and not res[0].host_short:
        lines.append(f"the head {boards[0].name} must hold the embeddings and LM head ({cost.first_bytes / MB:.0f} MB) but has room "
                     f"for {max(res[0].budget, 0) / MB:.0f} MB after the runtime and headroom")
    elif needed <= have and not res[0].host_short:
        lines.append("in total there is enough memory, but no split into contiguous layer ranges fits every board "
                     "(one layer with its KV cache needs "
                     f"{max(sum(m.memory(i, i + 1, False)) for i in range(m.n)) / MB:.0f} MB)")
    options = []
    fit = lambda **kw: _fits(**{**dict(boards=boards, cost=cost, slots=slots, ctx=max_context, runtime_mb=runtime_mb,
                                       headroom=headroom, link_gbps=link_gbps), **kw})
    variants = [("", cost)] + sorted(((f"--quantize {name} ", q) for name, q in (quant_options or {}).items()
                                      if sum(q.layer_bytes) + q.first_bytes < m.lb[m.n] + cost.first_bytes),
                                     key=lambda v: -(sum(v[1].layer_bytes) + v[1].first_bytes))
    for flag, qcost in variants:
        qkv = sum(qcost.kv_bytes_per_token)
        if flag:
            qshard = (sum(qcost.layer_bytes) + qcost.first_bytes) / MB
            plan = fit(cost=qcost)
            if plan is not None:
                options.append({"option": flag.strip(), "fits": True,
                                "detail": f"weights {qshard:.0f} MB in memory, about {plan.est_single_tok_s:.1f} tok/s"})
                continue
        c = _largest_fitting(1, max_context - 1, lambda c: fit(cost=qcost, ctx=c) is not None)
        if c is not None:
            options.append({"option": f"{flag}--max-context {c}", "fits": True,
                            "detail": f"KV cache {qkv * slots * c / MB:.0f} MB"})
        s = _largest_fitting(1, slots - 1, lambda s: fit(cost=qcost, slots=s) is not None)
        if s is not None:
            options.append({"option": f"{flag}--slots {s}", "fits": True,
                            "detail": f"{s} requests at once, KV cache {qkv * s * max_context / MB:.0f} MB"})
    # More boards like the largest worker (or the head, alone), added at the end of the ring.
    like = max(boards[1:] or boards[:1], key=lambda b: b.memory_mb + (b.gpu["memory_mb"] if b.gpu else 0))
    for extra in range(1, 17):
        more = boards + [Board(f"{like.name}+{i}", like.memory_mb, like.gflops, like.gbps, like.gpu, like.arch,
                               like.cores) for i in range(extra)]
        if res[0].budget < cost.first_bytes:
            break
        if fit(boards=more) is not None:
            options.append({"option": f"{extra} more board{'s' if extra > 1 else ''} like {like.name}",
                            "fits": True, "detail": f"{like.memory_mb:.0f} MB each"})
            break
    # Another board as the head, when the head is what cannot hold the embeddings and head.
    if res[0].budget < cost.first_bytes:
        for k in range(1, len(boards)):
            order = [boards[k]] + boards[:k] + boards[k + 1:]
            if fit(boards=order) is not None:
                options.append({"option": f"{boards[k].name} as the head (first in the boards file / inventory)",
                                "fits": True, "detail": f"it has {boards[k].memory_mb:.0f} MB"})
                break
        if res[0].host_short:
            options.append({"option": f"more host memory on {boards[0].name}", "fits": True,
                            "detail": "see above: a GPU rank loads its stage through host memory"})
        else:
            need_head = (cost.first_bytes / MB + runtime_mb) / (1 - headroom)
            options.append({"option": f"a head with at least {need_head:.0f} MB", "fits": True,
                            "detail": "the head holds the embeddings and LM head"})
    if options:
        lines.append("what would make it fit:")
        lines.extend(f"  {o['option']}: {o['detail']}" for o in options)
    else:
        lines.append("no single change tried (quantization, shorter context, fewer slots, up to 16 more boards) "
                     "makes it fit")
    return DoesNotFit("\n".join(lines), needed_mb=needed, have_mb=have, options=options)
