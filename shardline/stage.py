"""What every family's stage shares: the packed micro-batch, the preallocated KV cache and attention over it.

A micro-batch is a packed [T, hidden] tensor of several sequences' tokens (`Seq` says whose rows are
whose), so every matmul runs once for all sequences and only attention is per sequence. The maths of
each model family (norms, projections, RoPE, MLP) lives in shardline/models/<family>.py; this file is
the part they have in common, and `load_stage` picks the family named by the manifest.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Seq:
    """One sequence's share of a micro-batch."""
    slot: int   # KV-cache row this sequence owns on every stage
    start: int  # position of its first token in this micro-batch (= tokens already cached)
    n: int      # tokens it contributes (prompt chunk at prefill, 1 at decode)


class Stage(Protocol):
    """What the engine and the workers use of a stage, whatever its family (shardline/models/)."""
    max_context: int   # the longest sequence this stage serves exactly

    def embed(self, ids: torch.Tensor, seqs: list[Seq]) -> torch.Tensor: ...    # stage 0: [T] ids -> [T, d]
    def forward(self, x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor: ...    # [T, d] -> [T, d] through its layers
    def head(self, x: torch.Tensor) -> torch.Tensor: ...                        # stage 0: [B, d] -> [B, vocab] logits


def positions(seqs: list[Seq]) -> torch.Tensor:
    """[T] the position of every packed token."""
    return torch.cat([torch.arange(s.start, s.start + s.n) for s in seqs])


class KVCache:
    """Keys and values of this stage's layers for every slot, allocated once:
    [layers, slots, kv_heads, context, head_dim]. Grouped-query attention (fewer kv heads than query
    heads) is SDPA's enable_gqa: the cache holds only the kv heads.

    The cache must start as zeros, not torch.empty: masked positions still enter SDPA's sums with
    weight 0, and 0 * NaN is NaN, so a garbage NaN left by an earlier allocation would poison a
    sequence (seen on small caches, which the allocator recycles). It is an anonymous mapping of its
    own (see _zero_pages), so it costs RSS as sequences fill it, not at start."""

    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int,
                 device=None):
        shape = (layers, slots, kv_heads, context, head_dim)
        if math.prod(shape) == 0:                    # a stage with no layers (rank 0 with only the head)
            self.k = self.v = torch.zeros(shape, device=device)
        elif device is None or torch.device(device).type == "cpu":
            self._maps = [_zero_pages(shape), _zero_pages(shape)]
            self.k, self.v = (torch.frombuffer(m, dtype=torch.float32).view(shape) for m in self._maps)
        else:
            self.k = torch.zeros(shape, device=device)
            self.v = torch.zeros(shape, device=device)
        self.context, self.kv_heads, self.head_dim = context, kv_heads, head_dim

    def plan(self, seqs: list[Seq]) -> "Plan":
        """Where each sequence's rows are, and (for two or more one-token sequences) the batched
        decode attention's indices and mask, built once for all of this stage's layers."""
        plan, off = Plan(), 0
        for s in seqs:
            end = s.start + s.n
            if end > self.context:
                raise ValueError(f"sequence in slot {s.slot} reaches position {end} > context {self.context}")
            (plan.decode if s.n == 1 else plan.chunks).append((off, s))
            off += s.n
        if len(plan.decode) < 2:
            plan.chunks += plan.decode
            plan.decode = []
            return plan
        rows, slots, pos = (torch.tensor(v) for v in zip(*[(o, s.slot, s.start) for o, s in plan.decode]))
        # Attention over the contiguous range of cache rows lo..hi (a view, no copy), up to the longest
        # sequence: each query sees only its own row's first start+1 positions, the rest is masked out.
        # Masked positions hold finite values (earlier sequences' keys, or the zero pages of the
        # never-written cache), so their zero weights contribute exactly nothing.
        lo, hi, width = int(slots.min()), int(slots.max()) + 1, int(pos.max()) + 1
        mask = torch.zeros(hi - lo, 1, 1, width, dtype=torch.bool)
        mask[..., 0] = True                     # rows of the range not in this batch: any finite answer
        mask[slots - lo] = (torch.arange(width) <= pos[:, None]).view(-1, 1, 1, width)
        dev = self.k.device
        plan.rows, plan.slots, plan.pos, plan.idx = rows.to(dev), slots.to(dev), pos.to(dev), (slots - lo).to(dev)
        plan.range, plan.width, plan.mask = (lo, hi), width, mask.to(dev)
        return plan

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: "Plan") -> torch.Tensor:
        """q [T, H, hd], k and v [T, KV, hd] of the packed tokens (RoPE already applied): store k, v in
        layer li's cache and return causal attention over each sequence's cache, [T, H * hd]."""
        T, H, hd = q.shape
        gqa = H != self.kv_heads
        out = q.new_empty(T, H * hd)
        kcache, vcache = self.k[li], self.v[li]                                  # [slots, KV, ctx, hd]
        if plan.decode:
            rows = plan.rows
            kcache[plan.slots, :, plan.pos] = k[rows]
            vcache[plan.slots, :, plan.pos] = v[rows]
            (lo, hi), w = plan.range, plan.width
            qs = q.new_zeros(hi - lo, H, 1, hd)
            qs[plan.idx] = q[rows].unsqueeze(2)
            o = F.scaled_dot_product_attention(qs, kcache[lo:hi, :, :w], vcache[lo:hi, :, :w],
                                               attn_mask=plan.mask, enable_gqa=gqa)  # [hi-lo, H, 1, hd]
            out[rows] = o[plan.idx].view(-1, H * hd)
        for off, s in plan.chunks:
            end = s.start + s.n
            kc, vc = kcache[s.slot], vcache[s.slot]                               # [KV, ctx, hd]
            kc[:, s.start:end] = k[off:off + s.n].transpose(0, 1)
            vc[:, s.start:end] = v[off:off + s.n].transpose(0, 1)
            if s.n == 1:   # one sequence decoding: two small bmm, half SDPA's time (measured 16 vs 34 us)
                qg = q[off].view(self.kv_heads, H // self.kv_heads, hd)                   # [KV, G, hd]
                p = torch.bmm(qg, kc[:, :end].transpose(1, 2)).mul_(hd ** -0.5).softmax(-1)  # [KV, G, end]
                out[off] = torch.bmm(p, vc[:, :end]).view(H * hd)
                continue
            mask = None
            if s.n > 1 and s.start > 0:  # a later prompt chunk: causal, offset by what is cached
                mask = torch.ones(s.n, end, dtype=torch.bool, device=q.device).tril(diagonal=s.start)
            o = F.scaled_dot_product_attention(q[off:off + s.n].transpose(0, 1), kc[:, :end], vc[:, :end],
                                               attn_mask=mask, is_causal=s.n > 1 and s.start == 0,
                                               enable_gqa=gqa)                    # [H, n, hd]
            out[off:off + s.n] = o.transpose(0, 1).reshape(s.n, H * hd)
        return out


def _zero_pages(shape):
    """Zeroed memory the kernel maps a 4 KiB page at a time, when first written. Transparent huge
    pages are turned off for it: with THP the first token of a sequence would take a 2 MiB page per
    (layer, slot, kv head) row of 1 MiB, and a few short requests would fill the whole cache (measured:
    +130 MiB of RSS for 20 tokens in one slot on a SmolLM2-135M stage)."""
    import mmap
    buf = mmap.mmap(-1, math.prod(shape) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return buf


@dataclass
class Plan:
    chunks: list = field(default_factory=list)   # (row offset, Seq): attention one sequence at a time
    decode: list = field(default_factory=list)   # (row offset, Seq): one token each, attention batched
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    range: tuple[int, int] = (0, 0)
    width: int = 0
    mask: torch.Tensor | None = None


def read_transposed(path: Path, name: str, block: int = 2048) -> torch.Tensor:
    """A [rows, cols] tensor of a safetensors file as a contiguous float32 [cols, rows] one, read a
    block of rows at a time. The file is opened per block: safetensors maps it, and the pages read stay
    in the process's RSS until it is closed, so this keeps one copy of the matrix in memory, not two."""
    from safetensors import safe_open
    out = None
    for a in itertools.count(0, block):
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(name)
            rows, cols = sl.get_shape()
            part = sl[a:min(rows, a + block)]
            if out is None:
                out = torch.empty(cols, rows, dtype=torch.float32)
            out[:, a:a + part.shape[0]] = part.t()
            del part
        if a + block >= rows:
            return out


def pick_device(device: str | None = "auto", quant: dict | None = None) -> torch.device:
    """Where a stage runs: `auto` takes a CUDA GPU when torch sees one (float shards only: the int8 and
    int4 kernels used here are CPU kernels), else the CPU."""
    if device in (None, "cpu"):
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not quant else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU here (use --device cpu or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here, numbered "
                         "from 0 (use --device cuda, auto or cpu)")
    if quant and device != "cpu":
        raise ValueError(f"--device {device}: quantized shards run on the CPU kernels only (use --device cpu)")
    return torch.device(device)


def load_stage(manifest, k: int, path: Path, slots: int, max_context: int | None, device: str | None = None):
    """Stage k of a split, built by the family module the manifest names, on `device` (pick_device).
    Whatever the device, a stage takes and returns host (CPU) tensors: activations travel as host
    buffers, and the engine samples on the host."""
    from shardline.manifest import FIX_DISTRIBUTE, ShardError
    from shardline.models import family
    fam = family(manifest.family)
    entry = manifest.stage(k)
    quant = manifest.data.get("quantization")
    try:
        where = pick_device(device, quant)
    except ValueError as err:      # this board's --device, not its shard: no re-split helps
        raise ShardError(f"rank {k}: {err}") from err
    try:
        return fam.Stage.load(path, manifest.config, tuple(entry["layers"]), k == 0, slots, max_context,
                              quant=quant, tied=manifest.data["tied_lm_head"], device=where)
    except KeyError as err:
        raise ShardError(f"{path}: tensor {err} is missing (damaged, or from another split); {FIX_DISTRIBUTE}") from err
    except ValueError as err:
        raise ShardError(f"{path}: {err}; {FIX_DISTRIBUTE}") from err
