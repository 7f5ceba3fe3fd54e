"""The matmul weights of a stage: float (as stored) or quantized (shardline/quant.py), one callable each."""
from __future__ import annotations

import os
import platform
from functools import cache

import torch
import torch.nn.functional as F

# Which kernel multiplies float weights on the CPU: "onednn" (torch.ops.mkldnn._linear_pointwise, the
# oneDNN matmul that torch.compile's CPU backend calls, on the weight as stored) or "aten" (F.linear /
# addmm, i.e. MKL's sgemm on x86). Measured on the dev VM (AMD EPYC, AVX-512, 2 threads), weights out
# of cache (every matrix of several layers read once per token):
#   30 SmolLM2 layers + head, 1 row: oneDNN 18.6-19.1 ms, aten (x @ W, W [in, out]) 24.8 ms
#                             16 rows: oneDNN 24-28 ms, aten 57 ms
#   6 TinyLlama layers,       1 row: oneDNN on [out, in] 37-39 ms, on [in, out] 47-51, aten 50 ms
#                             16 rows: oneDNN 56 ms ([out, in]) / 64 ([in, out]), aten 113-135 ms
# so the llama families keep [out, in] under oneDNN and [in, out] under aten (Stage.load); GPT-2's
# Conv1D weights stay [in, out] (oneDNN reads its 768-wide ones as fast that way). Unmeasured on
# aarch64 boards, so "auto" picks oneDNN on x86-64 only; SHARDLINE_FP32_MATMUL=onednn|aten overrides.
FP32_MATMUL_ENV = "SHARDLINE_FP32_MATMUL"


@cache
def fp32_matmul() -> str:
    """"onednn" or "aten" for this process (see FP32_MATMUL_ENV); oneDNN only when PyTorch has it and it
    gives F.linear's result on a small check."""
    want = os.environ.get(FP32_MATMUL_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "onednn", "aten"):
        raise ValueError(f"{FP32_MATMUL_ENV}={want!r}: use auto, onednn or aten")
    if want == "aten" or (want == "auto" and platform.machine().lower() not in ("x86_64", "amd64")):
        return "aten"
    try:
        x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
        ok = torch.backends.mkldnn.is_available() and torch.allclose(
            torch.ops.mkldnn._linear_pointwise(x, w.t().contiguous().t(), b, "none", [], ""), F.linear(x, w, b),
            atol=1e-4)
    except (AttributeError, RuntimeError):
        ok = False
    return "onednn" if ok else "aten"


def padded_rows(m: int) -> int:
    """The row count oneDNN is asked for: a power of two up to 64, then a multiple of 64. oneDNN keeps
    ~0.6 MiB of heap for every (rows, in, out) it has seen, for good (measured: 1,024 shapes grew a
    process by 580 MiB, with or without its primitive cache; the same shape on other weights costs
    nothing). Padding bounds that to ~10 row counts per weight shape at max_batch_tokens 256, for at
    most 63 wasted rows."""
    return 1 << (m - 1).bit_length() if m <= 64 else -(-m // 64) * 64


def matmul(x: torch.Tensor, w_oi: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_oi^T + b for x [rows, in] and a float weight w_oi of shape [out, in], which may be a
    transposed view of a contiguous [in, out] matrix (oneDNN reads some shapes fastest that way)."""
    if x.device.type == "cpu" and fp32_matmul() == "onednn" and x.dtype == torch.float32 and x.dim() == 2:
        m = x.shape[0]
        p = padded_rows(m) if m else 0
        if p != m:
            x = F.pad(x, (0, 0, 0, p - m))
        y = torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), w_oi, b, "none", [], "")
        return y if p == m else y[:m]
    return F.linear(x, w_oi, b)


class Dense:
    """x @ W^T + b on a float weight. conv1d: W is stored [in, out] (GPT-2's Conv1D; the llama families'
    weights too when the kernel is aten, see Stage.load), else [out, in] as nn.Linear keeps it."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, conv1d: bool = False):
        self.w, self.b, self.conv1d = w, b, conv1d
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.w.t() if self.conv1d else self.w, self.b)

    def to(self, device) -> "Dense":
        return Dense(self.w.to(device), None if self.b is None else self.b.to(device), self.conv1d)


def linear(t: dict[str, torch.Tensor], name: str, bias: str | None = None, conv1d: bool = False,
           quant: dict | None = None, edge: bool = False):
    """The callable for weight `name` of a shard's tensors t (with bias `bias` if the model has one).
    A quantized shard stores a matmul weight as name.<suffix> parts in [out, in] layout (GPT-2's Conv1D
    weights are transposed by the splitter first); norms, biases and small tensors stay float.
    edge: the embedding, LM head (or GPT-2's position table), stored in the manifest's "head" scheme
    (an int4 split keeps them int8 unless split otherwise), where the blocks' weights take "scheme"."""
    b = t.get(bias) if bias else None
    if name in t:
        return Dense(t[name], b, conv1d)
    if quant:
        from shardline.quant import QLinear, check_parts, suffixes
        if f"{name}.qweight" not in t:
            raise KeyError(name)
        want = (quant.get("head") or quant["scheme"]) if edge else quant["scheme"]
        # what the shard holds, by its codes' type (int8 codes are int8, int4 ones two to a uint8), so a
        # missing part is named by check_parts below rather than taken for the other scheme
        stored = {torch.int8: "int8", torch.uint8: "int4"}.get(t[f"{name}.qweight"].dtype, want)
        if stored != want:
            role = "the embedding/head" if edge else "the blocks"
            raise ValueError(f"tensor {name} is {stored} but the manifest says {want} for {role}: re-split the "
                             "model (the shard does not match its manifest)")
        scheme = want
        parts = {s: t[f"{name}.{s}"] for s in suffixes(scheme) if f"{name}.{s}" in t}
        check_parts(name, parts, scheme)                  # a missing scale: ValueError naming the tensor
        q = QLinear.from_parts(parts, scheme, bias=b, name=name)
        # int4 repacks its codes for the kernel: drop the stored ones now, not when the whole stage is
        # built, so a rank's peak holds one copy of its codes (measured: int4 workers peaked 14-25 MiB,
        # one shard's codes, above int8's)
        for s in parts:
            del t[f"{name}.{s}"]
        return q
    raise KeyError(name)


class Ends:
    """Stage 0's token embedding and LM head. A float head is kept transposed ([d, vocab]): x @ W^T with
    W^T contiguous is 10-50% faster than F.linear on W (measured on the dev VM, 1-16 rows). A tied head
    is the embedding matrix itself, stored once, so then it also serves the embedding lookups."""

    def __init__(self, t: dict[str, torch.Tensor], embed: str, head: str, tied: bool, quant=None,
                 head_t: torch.Tensor | None = None):
        name = embed if tied else head
        self.t, self.q = head_t, None
        if self.t is None:
            if name in t:
                self.t = t[name].t().contiguous()                                # [d, vocab]
            else:
                self.q = linear(t, name, quant=quant, edge=True)
        self.table = None if tied else (t[embed] if embed in t else linear(t, embed, quant=quant, edge=True))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.t.index_select(1, ids).t() if self.t is not None else self.q.rows(ids)
        return self.table[ids] if isinstance(self.table, torch.Tensor) else self.table.rows(ids)   # [T, d]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return matmul(h, self.t.t()) if self.t is not None else self.q(h)      # [B, vocab]


def on_device(tensors: dict[str, torch.Tensor], head_t: torch.Tensor | None, device) -> tuple:
    """(torch.device, tensors, head_t) with the tensors moved there: a GPU board keeps its weights and
    cache in GPU memory (float shards only); on the CPU nothing moves."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        tensors = {n: t.to(device) for n, t in tensors.items()}
        head_t = None if head_t is None else head_t.to(device)
    return device, tensors, head_t


def read_shard(path, first: bool, embed: str, head: str, tied: bool, transpose=None, device=None):
    """(tensors, head_t): a shard's tensors, each in its own aligned allocation, with stage 0's float
    head matrix read straight into its transposed form. The file is opened per tensor: safetensors
    memory-maps it, its tensors are views into that one mapping (unaligned, and keeping every page
    they touched), so each is copied out and the mapping dropped before the next. The rank then holds
    one copy of its shard, not the shard plus a mapped one, and no kernel needs to realign a copy.
    transpose(name) -> True: keep that [out, in] matrix as a contiguous [in, out] one (read transposed,
    no second copy): for one row, x @ W with W [in, out] reads memory 1.3-1.5x faster than F.linear on
    [out, in] (measured on the dev VM, 30 SmolLM2-sized matrices, out of cache).
    device: a GPU takes each tensor as it is read, so host memory holds one tensor at a time, never
    the shard (splitter/boards.py plans a GPU board's host memory for its largest tensor)."""
    from safetensors import safe_open

    from shardline.stage import read_transposed
    name = embed if tied else head
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    skip = first and name in names
    tensors = {}
    for n in names:
        if skip and n == name:
            continue
        with safe_open(str(path), framework="pt") as f:
            src = f.get_tensor(n)
            if transpose is not None and src.ndim == 2 and transpose(n):
                src = src.t()
            tensors[n] = torch.empty(src.shape, dtype=src.dtype, device=device).copy_(src)
            del src
    head_t = read_transposed(path, name) if skip else None
    return tensors, (head_t if head_t is None or device is None else head_t.to(device))
